//! Secrets sealed to a P-384 public key: ECDH with an ephemeral key, HKDF-SHA-384, and
//! AES-256-GCM. Two recipients use it:
//! - a joining node: the leader seals the ledger secret to the key that the node's evidence
//!   bound, so only the holder of that key, inside the attested VM, opens it;
//! - a recovery member: the leader seals each member's recovery share to the member's
//!   encryption key (`gov.members`), which the member keeps apart from its signing key.
//!
//! The associated data says what a blob is and where it belongs, so a blob sealed for one
//! purpose never opens as another.

use p384::elliptic_curve::sec1::ToEncodedPoint;
use p384::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rand_core::{OsRng, RngCore};
use ring::{aead, hkdf};

const INFO: &[u8] = b"cloister sealed to node v1";
const POINT_LEN: usize = 97;
const NONCE_LEN: usize = 12;

struct KeyLen;
impl hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        32
    }
}

fn aead_key(shared: &[u8], ephemeral: &[u8]) -> aead::LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA384, ephemeral).extract(shared);
    let mut key = [0u8; 32];
    prk.expand(&[INFO], KeyLen).and_then(|okm| okm.fill(&mut key)).expect("HKDF output of 32 bytes");
    aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &key).expect("an AES-256 key"))
}

/// A new encryption key pair from the OS random source: the private key (PKCS#8 PEM) and the
/// public key (SPKI PEM), as `cloister keygen` writes them for a member.
pub fn generate_key() -> anyhow::Result<(String, String)> {
    let key = p384::SecretKey::random(&mut OsRng);
    let private = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| anyhow::anyhow!("encoding a private key: {e}"))?;
    let public = key
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("encoding a public key: {e}"))?;
    Ok((private.to_string(), public))
}

/// The files of a member's encryption key pair in `dir`: `NAME.enc.key.pem` (private, owner-only)
/// and `NAME.enc.pub.pem` (what `set_member` and `[genesis] members` take).
pub fn key_files(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    (dir.join(format!("{name}.enc.key.pem")), dir.join(format!("{name}.enc.pub.pem")))
}

/// Generates a member's encryption key pair and writes it to [`key_files`].
pub fn write_key_pair(dir: &std::path::Path, name: &str) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (private, public) = generate_key()?;
    let (private_path, public_path) = key_files(dir, name);
    crate::identity::write_private(&private_path, private.as_bytes())?;
    crate::identity::write_durably(&public_path, public.as_bytes(), false)?;
    Ok((private_path, public_path))
}

/// The DER of a P-384 public key given as SPKI PEM, or why it is not one.
pub fn public_key_der(pem: &str) -> Result<Vec<u8>, String> {
    let key = p384::PublicKey::from_public_key_pem(pem.trim())
        .map_err(|e| format!("not a P-384 public key (SPKI PEM): {e}"))?;
    key.to_public_key_der().map(|d| d.as_bytes().to_vec()).map_err(|e| format!("encoding a public key: {e}"))
}

/// The SPKI PEM of the P-384 public key in `spki_der`, or why it is not one.
pub fn public_key_pem(spki_der: &[u8]) -> Result<String, String> {
    let key = p384::PublicKey::from_public_key_der(spki_der).map_err(|e| format!("not a P-384 public key: {e}"))?;
    key.to_public_key_pem(LineEnding::LF).map_err(|e| format!("encoding a public key: {e}"))
}

/// A node's encryption key pair, generated inside its guest and never seen outside it: what the
/// leader seals ledger secrets to (see the module's first recipient).
pub struct KeyPair {
    /// The private key, PKCS#8 PEM.
    pub private_pem: String,
    /// The public key, SPKI DER.
    pub spki_der: Vec<u8>,
}

impl KeyPair {
    pub fn generate() -> anyhow::Result<KeyPair> {
        let (private_pem, _) = generate_key()?;
        KeyPair::from_private_pem(&private_pem).map_err(anyhow::Error::msg)
    }

    /// The pair whose private key is `private_pem` (PKCS#8 PEM).
    pub fn from_private_pem(private_pem: &str) -> Result<KeyPair, String> {
        let secret = p384::SecretKey::from_pkcs8_pem(private_pem)
            .map_err(|e| format!("the key is not a P-384 private key: {e}"))?;
        let spki_der = secret
            .public_key()
            .to_public_key_der()
            .map_err(|e| format!("encoding a public key: {e}"))?
            .as_bytes()
            .to_vec();
        Ok(KeyPair { private_pem: private_pem.to_owned(), spki_der })
    }
}

/// Seals `plaintext` to the P-384 public key in `spki_der`, with `aad` authenticated alongside.
pub fn seal_to(spki_der: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, String> {
    let recipient = p384::PublicKey::from_public_key_der(spki_der)
        .map_err(|e| format!("the recipient's key is not a P-384 public key: {e}"))?;
    let ephemeral = p384::ecdh::EphemeralSecret::random(&mut OsRng);
    let point = ephemeral.public_key().to_encoded_point(false);
    let shared = ephemeral.diffie_hellman(&recipient);
    let key = aead_key(shared.raw_secret_bytes(), point.as_bytes());
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    let mut out = point.as_bytes().to_vec();
    out.extend_from_slice(&nonce);
    let mut body = plaintext.to_vec();
    key.seal_in_place_append_tag(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(aad), &mut body)
        .map_err(|_| "sealing failed".to_owned())?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Opens what [`seal_to`] sealed, with the recipient's private key (PKCS#8 PEM).
pub fn open_with(private_key_pem: &str, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String> {
    if sealed.len() < POINT_LEN + NONCE_LEN + aead::AES_256_GCM.tag_len() {
        return Err(format!("a sealed secret of {} bytes is too short", sealed.len()));
    }
    let secret = p384::SecretKey::from_pkcs8_pem(private_key_pem)
        .map_err(|e| format!("the key is not a P-384 private key: {e}"))?;
    let (point, rest) = sealed.split_at(POINT_LEN);
    let (nonce, body) = rest.split_at(NONCE_LEN);
    let ephemeral =
        p384::PublicKey::from_sec1_bytes(point).map_err(|e| format!("the sealed secret's ephemeral key: {e}"))?;
    let shared = p384::ecdh::diffie_hellman(secret.to_nonzero_scalar(), ephemeral.as_affine());
    let key = aead_key(shared.raw_secret_bytes(), point);
    let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| "a malformed nonce".to_owned())?;
    let mut body = body.to_vec();
    let plain = key
        .open_in_place(nonce, aead::Aad::from(aad), &mut body)
        .map_err(|_| "the sealed secret does not open with this key".to_owned())?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_pair_opens_what_is_sealed_to_its_public_key() {
        let pair = KeyPair::generate().unwrap();
        let again = KeyPair::from_private_pem(&pair.private_pem).unwrap();
        assert_eq!(again.spki_der, pair.spki_der);
        let sealed = seal_to(&pair.spki_der, b"aad", b"secret").unwrap();
        assert_eq!(open_with(&pair.private_pem, b"aad", &sealed).unwrap(), b"secret");
        let pem = public_key_pem(&pair.spki_der).unwrap();
        assert_eq!(public_key_der(&pem).unwrap(), pair.spki_der);
        assert!(public_key_pem(b"not a key").is_err());
        assert!(KeyPair::from_private_pem("not a key").is_err());
    }

    #[test]
    fn generated_keys_seal_and_open() {
        let (private, public) = generate_key().unwrap();
        let der = public_key_der(&public).unwrap();
        let sealed = seal_to(&der, b"aad", b"a share").unwrap();
        assert_eq!(open_with(&private, b"aad", &sealed).unwrap(), b"a share");
        assert!(public_key_der(&private).is_err(), "a private key is no public key");
        assert!(public_key_der("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").is_err());
    }

    #[test]
    fn only_the_recipient_opens() {
        let key = p384::SecretKey::random(&mut OsRng);
        let spki = key.public_key().to_public_key_der().unwrap();
        let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
        let sealed = seal_to(spki.as_bytes(), b"aad", b"the ledger secret").unwrap();
        assert_eq!(open_with(&pem, b"aad", &sealed).unwrap(), b"the ledger secret");
        assert!(open_with(&pem, b"other aad", &sealed).is_err());
        let other = p384::SecretKey::random(&mut OsRng).to_pkcs8_pem(LineEnding::LF).unwrap();
        assert!(open_with(&other, b"aad", &sealed).is_err());
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(open_with(&pem, b"aad", &flipped).is_err());
        assert!(open_with(&pem, b"aad", &sealed[..50]).is_err());
    }
}
