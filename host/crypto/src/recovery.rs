//! Recovery shares: the ledger secret wrapped under a fresh key, and that key split by Shamir
//! secret sharing over GF(256) (`blahaj`) into one share per recovery member, each sealed to the
//! member's encryption key ([`crate::envelope`]).
//!
//! Every share is bound to an issue: the service (the hex SHA-256 of its identity's
//! certificate), the issue's version, and the member. The binding is the associated data of the
//! sealed share and the input of its public digest, so a recovering node that holds only the
//! public record can tell a member's genuine share from a forged one, one from another service
//! or issue, and one that another member replays.

use blahaj::{Share, Sharks};

use crate::seal::{Purpose, SECRET_BYTES, Sealer};

/// Most recovery members one issue can serve: GF(256) has 255 non-zero points to give out.
pub const RECOVERY_MEMBERS_MAX: usize = 255;

const SHARE_AAD: &str = "cloister recovery share v1";
const DIGEST_CONTEXT: &str = "cloister recovery share digest v1";
const WRAP_AAD: &str = "cloister recovery wrapped secret v1";

/// What binds one member's share: the service, the issue, the member.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// Hex SHA-256 of the service identity's certificate (DER).
    pub service: &'a str,
    pub version: u64,
    /// The member's id.
    pub member: &'a str,
}

impl Binding<'_> {
    fn bytes(&self, label: &str) -> Vec<u8> {
        // Length-prefixed fields, so no two bindings encode alike.
        let mut out = Vec::new();
        for field in [label.as_bytes(), self.service.as_bytes(), &self.version.to_be_bytes(), self.member.as_bytes()] {
            out.extend_from_slice(&(field.len() as u32).to_be_bytes());
            out.extend_from_slice(field);
        }
        out
    }
}

fn wrap_aad(service: &str, version: u64) -> Vec<u8> {
    Binding { service, version, member: "" }.bytes(WRAP_AAD)
}

/// The public digest of a share under its binding (BLAKE3 in key-derivation mode).
pub fn share_digest(binding: Binding<'_>, share: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(DIGEST_CONTEXT);
    hasher.update(&binding.bytes(SHARE_AAD));
    hasher.update(share);
    *hasher.finalize().as_bytes()
}

/// One member's part of an issue.
#[derive(Debug, Clone)]
pub struct IssuedShare {
    pub member: String,
    /// The share, sealed to the member's encryption key.
    pub sealed: Vec<u8>,
    pub digest: [u8; 32],
}

/// An issue of shares: the wrapped secret and a share per member.
#[derive(Debug, Clone)]
pub struct Issue {
    pub wrapped_secret: Vec<u8>,
    pub shares: Vec<IssuedShare>,
}

/// Wraps `secret` under a fresh key and splits that key among `members` (id and the DER of its
/// encryption key), any `threshold` of whom rebuild it.
pub fn issue(
    secret: &[u8; SECRET_BYTES],
    service: &str,
    version: u64,
    threshold: u32,
    members: &[(String, Vec<u8>)],
) -> Result<Issue, String> {
    if members.is_empty() || members.len() > RECOVERY_MEMBERS_MAX {
        return Err(format!(
            "{} recovery members: shares are issued to 1..={RECOVERY_MEMBERS_MAX} (RECOVERY_MEMBERS_MAX)",
            members.len()
        ));
    }
    if threshold == 0 || threshold as usize > members.len() {
        return Err(format!("a threshold of {threshold} with {} recovery members", members.len()));
    }
    let wrapping_key = Sealer::generate_secret();
    let wrapped_secret = Sealer::new(&wrapping_key).seal(Purpose::RecoveryWrap, &wrap_aad(service, version), secret);
    let dealer = Sharks(threshold as u8).dealer(&wrapping_key);
    let mut shares = Vec::with_capacity(members.len());
    for ((member, key_der), share) in members.iter().zip(dealer) {
        let share = Vec::from(&share);
        let binding = Binding { service, version, member };
        let sealed = crate::envelope::seal_to(key_der, &binding.bytes(SHARE_AAD), &share)
            .map_err(|e| format!("member {member}'s encryption key: {e}"))?;
        shares.push(IssuedShare { member: member.clone(), sealed, digest: share_digest(binding, &share) });
    }
    Ok(Issue { wrapped_secret, shares })
}

/// Opens a member's sealed share with its encryption key (PKCS#8 PEM) and checks it against its
/// public digest.
pub fn open_share(
    encryption_key_pem: &str,
    binding: Binding<'_>,
    sealed: &[u8],
    digest: &[u8; 32],
) -> Result<Vec<u8>, String> {
    let share = crate::envelope::open_with(encryption_key_pem, &binding.bytes(SHARE_AAD), sealed)
        .map_err(|e| format!("member {}'s share does not open: {e}", binding.member))?;
    if share_digest(binding, &share) != *digest {
        return Err(format!("member {}'s share does not match its digest", binding.member));
    }
    Ok(share)
}

/// Rebuilds the wrapping key from `threshold` or more distinct shares (already checked against
/// their digests) and unwraps the ledger secret.
pub fn recover_secret(
    shares: &[Vec<u8>],
    threshold: u32,
    service: &str,
    version: u64,
    wrapped_secret: &[u8],
) -> Result<[u8; SECRET_BYTES], String> {
    if threshold == 0 || threshold as usize > RECOVERY_MEMBERS_MAX {
        return Err(format!("a threshold of {threshold}: it must be 1..={RECOVERY_MEMBERS_MAX}"));
    }
    let mut parsed: Vec<Share> = Vec::with_capacity(shares.len());
    for bytes in shares {
        if bytes.len() != SECRET_BYTES + 1 {
            return Err(format!("a share is {} bytes, not {}", bytes.len(), SECRET_BYTES + 1));
        }
        let share = Share::try_from(bytes.as_slice()).map_err(|e| format!("a malformed share: {e}"))?;
        // Interpolation divides by the difference of two points: a repeated point is refused.
        if share.x.0 == 0 || parsed.iter().any(|p| p.x.0 == share.x.0) {
            return Err("two shares are the same share, or one is no share".into());
        }
        parsed.push(share);
    }
    if parsed.len() < threshold as usize {
        return Err(format!("{} shares of the {threshold} needed", parsed.len()));
    }
    let key = Sharks(threshold as u8).recover(&parsed).map_err(str::to_owned)?;
    let key = <[u8; SECRET_BYTES]>::try_from(key).map_err(|_| "the shares rebuild no key".to_owned())?;
    let secret = Sealer::new(&key)
        .open(Purpose::RecoveryWrap, &wrap_aad(service, version), wrapped_secret)
        .map_err(|_| "the shares do not unwrap the ledger secret".to_owned())?;
    <[u8; SECRET_BYTES]>::try_from(secret).map_err(|_| "the wrapped secret is no ledger secret".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Member {
        id: String,
        private: String,
        der: Vec<u8>,
    }

    fn members(n: usize) -> Vec<Member> {
        (0..n)
            .map(|i| {
                let (private, public) = crate::envelope::generate_key().unwrap();
                Member { id: format!("m{i}"), private, der: crate::envelope::public_key_der(&public).unwrap() }
            })
            .collect()
    }

    fn issue_to(ms: &[Member], secret: &[u8; 32], threshold: u32) -> Issue {
        let list: Vec<_> = ms.iter().map(|m| (m.id.clone(), m.der.clone())).collect();
        issue(secret, "svc", 1, threshold, &list).unwrap()
    }

    fn opened(ms: &[Member], issue: &Issue, i: usize) -> Vec<u8> {
        let b = Binding { service: "svc", version: 1, member: &ms[i].id };
        open_share(&ms[i].private, b, &issue.shares[i].sealed, &issue.shares[i].digest).unwrap()
    }

    #[test]
    fn a_threshold_of_shares_recovers_the_secret_and_fewer_do_not() {
        let ms = members(3);
        let secret = Sealer::generate_secret();
        let issued = issue_to(&ms, &secret, 2);
        let shares: Vec<Vec<u8>> = (0..3).map(|i| opened(&ms, &issued, i)).collect();
        for pair in [[0, 1], [0, 2], [1, 2]] {
            let two = [shares[pair[0]].clone(), shares[pair[1]].clone()];
            assert_eq!(recover_secret(&two, 2, "svc", 1, &issued.wrapped_secret).unwrap(), secret);
        }
        let one = recover_secret(&shares[..1], 2, "svc", 1, &issued.wrapped_secret).unwrap_err();
        assert!(one.contains("1 shares of the 2 needed"), "{one}");
        // The same share twice is one share.
        let twice = [shares[0].clone(), shares[0].clone()];
        assert!(recover_secret(&twice, 2, "svc", 1, &issued.wrapped_secret).is_err());
        // The wrapped secret is bound to its service and issue.
        assert!(recover_secret(&shares, 2, "svc", 2, &issued.wrapped_secret).is_err());
        assert!(recover_secret(&shares, 2, "other", 1, &issued.wrapped_secret).is_err());
    }

    #[test]
    fn a_share_opens_only_for_its_member_service_and_issue() {
        let ms = members(2);
        let issued = issue_to(&ms, &[7; 32], 1);
        let (sealed, digest) = (&issued.shares[0].sealed, &issued.shares[0].digest);
        let b = |service, version, member| Binding { service, version, member };
        assert!(open_share(&ms[0].private, b("svc", 1, "m0"), sealed, digest).is_ok());
        // Another member's key, another member's name, another service, another issue.
        assert!(open_share(&ms[1].private, b("svc", 1, "m0"), sealed, digest).is_err());
        assert!(open_share(&ms[0].private, b("svc", 1, "m1"), sealed, digest).is_err());
        assert!(open_share(&ms[0].private, b("other", 1, "m0"), sealed, digest).is_err());
        assert!(open_share(&ms[0].private, b("svc", 2, "m0"), sealed, digest).is_err());
        // A share replayed as another member's does not match that member's digest.
        let share = opened(&ms, &issued, 0);
        assert_ne!(share_digest(b("svc", 1, "m1"), &share), issued.shares[1].digest);
        assert_eq!(share_digest(b("svc", 1, "m0"), &share), *digest);
    }

    #[test]
    fn issues_are_bounded_by_the_members_and_the_field() {
        let ms = members(1);
        let list: Vec<_> = ms.iter().map(|m| (m.id.clone(), m.der.clone())).collect();
        assert!(issue(&[1; 32], "svc", 1, 2, &list).is_err(), "a threshold above the members");
        assert!(issue(&[1; 32], "svc", 1, 0, &list).is_err());
        assert!(issue(&[1; 32], "svc", 1, 1, &[]).is_err());
        let many = vec![list[0].clone(); RECOVERY_MEMBERS_MAX + 1];
        let e = issue(&[1; 32], "svc", 1, 1, &many).unwrap_err();
        assert!(e.contains("RECOVERY_MEMBERS_MAX"), "{e}");
        let most = vec![list[0].clone(); RECOVERY_MEMBERS_MAX];
        let issued = issue(&[1; 32], "svc", 1, RECOVERY_MEMBERS_MAX as u32, &most).unwrap();
        assert_eq!(issued.shares.len(), RECOVERY_MEMBERS_MAX);
    }
}
