//! Azure's THIM endpoint: the VCEK and its chain for the host the VM runs on.
//!
//! An Azure CVM cannot ask its SNP firmware for the VCEK, and AMD's KDS is not reachable from every
//! VM, so Azure serves the chain from the instance metadata service (link-local, plain HTTP). What it
//! returns is not trusted: the verifier checks the chain up to a pinned ARK like any other.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use x509_cert::der::pem;

/// Where THIM answers on every Azure VM.
pub const THIM_URL_DEFAULT: &str = "http://169.254.169.254/metadata/THIM/amd/certification";
/// How long a fetch may take, connection to last body byte: the service is on the host, so seconds
/// mean it is not there.
pub const THIM_TIMEOUT_MS: u64 = 5_000;
/// The largest answer read: three certificates in PEM are about 6 KiB.
pub const THIM_BODY_BYTES_MAX: usize = 64 << 10;

/// The certificates THIM returns, DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcekChain {
    pub vcek: Vec<u8>,
    pub ask: Option<Vec<u8>>,
    pub ark: Option<Vec<u8>>,
    /// The TCB version the VCEK is for, hex, as THIM reports it.
    pub tcbm: Option<String>,
}

/// THIM's answer; fields not listed (such as `cacheControl`) are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ThimAnswer {
    vcek_cert: String,
    #[serde(default)]
    certificate_chain: String,
    tcbm: Option<String>,
}

/// Fetches the VCEK chain from THIM at `url` (normally [`THIM_URL_DEFAULT`]), within `timeout`.
pub async fn fetch(url: &str, timeout: Duration) -> Result<VcekChain, String> {
    match tokio::time::timeout(timeout, get(url)).await {
        Ok(result) => result,
        Err(_) => Err(format!("THIM at {url} did not answer within {} ms", timeout.as_millis())),
    }
}

async fn get(url: &str) -> Result<VcekChain, String> {
    let uri: hyper::Uri = url.parse().map_err(|err| format!("THIM URL {url:?} is not a valid URI: {err}"))?;
    let request = http::Request::get(uri)
        .header("Metadata", "true")
        .body(Empty::<Bytes>::new())
        .map_err(|err| format!("THIM URL {url:?} cannot be requested: {err}"))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.map_err(|err| format!("THIM at {url} is unreachable: {err:?}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), THIM_BODY_BYTES_MAX).collect().await.map_err(|err| {
        if err.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            format!("THIM at {url} answered more than THIM_BODY_BYTES_MAX ({THIM_BODY_BYTES_MAX} bytes)")
        } else {
            format!("THIM at {url} broke off its answer: {err}")
        }
    })?;
    let body = body.to_bytes();
    if status != http::StatusCode::OK {
        return Err(format!("THIM at {url} answered {status}: {}", excerpt(&body)));
    }
    parse(&body).map_err(|err| format!("THIM at {url}: {err}"))
}

/// The chain from THIM's JSON: `vcekCert` one PEM certificate, `certificateChain` the ASK then the ARK.
fn parse(body: &[u8]) -> Result<VcekChain, String> {
    let answer: ThimAnswer = serde_json::from_slice(body)
        .map_err(|err| format!("the answer is not THIM's JSON ({err}): {}", excerpt(body)))?;
    let vcek = match certificates(&answer.vcek_cert, "vcekCert")?.as_slice() {
        [vcek] => vcek.clone(),
        other => return Err(format!("vcekCert holds {} certificates, not one", other.len())),
    };
    let mut chain = certificates(&answer.certificate_chain, "certificateChain")?.into_iter();
    let (ask, ark) = (chain.next(), chain.next());
    if chain.next().is_some() {
        return Err("certificateChain holds more than the ASK and the ARK".into());
    }
    Ok(VcekChain { vcek, ask, ark, tcbm: answer.tcbm })
}

/// The DER of each PEM certificate in `text`, in order; each must parse as an X.509 certificate.
fn certificates(text: &str, field: &str) -> Result<Vec<Vec<u8>>, String> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let end = rest.find(END).ok_or_else(|| format!("{field} has no {END} in {:?}", excerpt(rest.as_bytes())))?;
        let block = &rest[..end + END.len()];
        let n = out.len() + 1;
        let (label, der) = pem::decode_vec(block.as_bytes())
            .map_err(|err| format!("{field} certificate {n} is not PEM ({err}): {:?}", excerpt(block.as_bytes())))?;
        if label != "CERTIFICATE" {
            return Err(format!("{field} certificate {n} is PEM labelled {label:?}, not CERTIFICATE"));
        }
        crate::verify::parse_certificate(&der).map_err(|err| format!("{field} certificate {n} is not X.509: {err}"))?;
        out.push(der);
        rest = rest[end + END.len()..].trim_start();
    }
    Ok(out)
}

/// The start of a body, for errors: enough to recognise it, never a whole page.
fn excerpt(body: &[u8]) -> String {
    const EXCERPT_BYTES_MAX: usize = 200;
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES_MAX)]).into_owned();
    if body.len() > EXCERPT_BYTES_MAX { format!("{text}…") } else { text }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const VCEK_DER: &[u8] = include_bytes!("../testdata/milan/vcek_milan.der");
    const TEST_TIMEOUT: Duration = Duration::from_secs(5);

    fn pem_of(der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|l| std::str::from_utf8(l).unwrap()).collect();
        format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
    }

    fn der_of(pem_text: &[u8]) -> Vec<u8> {
        pem::decode_vec(pem_text).unwrap().1
    }

    /// THIM's answer for a Milan host: the test VCEK, and sev's copies of AMD's Milan ASK and ARK.
    fn thim_json() -> String {
        let chain = [sev::certs::snp::builtin::milan::ASK, sev::certs::snp::builtin::milan::ARK]
            .map(|pem| std::str::from_utf8(pem).unwrap().trim().to_owned())
            .join("\n");
        serde_json::json!({
            "cacheControl": "86400",
            "vcekCert": pem_of(VCEK_DER),
            "certificateChain": chain,
            "tcbm": "DB18000000000004",
        })
        .to_string()
    }

    /// A one-request-per-connection HTTP server on 127.0.0.1 that answers 400 without
    /// `Metadata: true`, like THIM, and otherwise `status` with `body`. `None` never answers.
    async fn serve(answer: Option<(u16, Vec<u8>)>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let Some((status, body)) = answer else {
                        std::future::pending::<()>().await;
                        return;
                    };
                    let has_metadata =
                        String::from_utf8_lossy(&request).to_ascii_lowercase().contains("\r\nmetadata: true\r\n");
                    let (status, body) = if has_metadata { (status, body) } else { (400, b"no Metadata".to_vec()) };
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(&body).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        format!("http://{addr}/metadata/THIM/amd/certification")
    }

    #[tokio::test]
    async fn thim_fetch_returns_the_der_chain() {
        let url = serve(Some((200, thim_json().into_bytes()))).await;
        let chain = fetch(&url, TEST_TIMEOUT).await.unwrap();
        assert_eq!(chain.vcek, VCEK_DER);
        assert_eq!(chain.ask, Some(der_of(sev::certs::snp::builtin::milan::ASK)));
        assert_eq!(chain.ark, Some(der_of(sev::certs::snp::builtin::milan::ARK)));
        assert_eq!(chain.tcbm.as_deref(), Some("DB18000000000004"));
    }

    #[tokio::test]
    async fn thim_fetch_sends_the_metadata_header() {
        // The fake answers 400 without the header, so success proves it was sent; a request without
        // it must see the 400.
        let url = serve(Some((200, thim_json().into_bytes()))).await;
        fetch(&url, TEST_TIMEOUT).await.unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let response = client.get(url.parse().unwrap()).await.unwrap();
        assert_eq!(response.status(), 400);
    }

    #[tokio::test]
    async fn thim_fetch_refuses_a_server_error() {
        let url = serve(Some((500, b"host agent unavailable".to_vec()))).await;
        let err = fetch(&url, TEST_TIMEOUT).await.unwrap_err();
        assert!(err.contains("500") && err.contains("host agent unavailable"), "{err}");
    }

    #[tokio::test]
    async fn thim_fetch_refuses_an_oversized_body() {
        let url = serve(Some((200, vec![b' '; THIM_BODY_BYTES_MAX + 1]))).await;
        let err = fetch(&url, TEST_TIMEOUT).await.unwrap_err();
        assert!(err.contains("THIM_BODY_BYTES_MAX"), "{err}");
    }

    #[tokio::test]
    async fn thim_fetch_refuses_malformed_json() {
        let url = serve(Some((200, b"{\"vcekCert\": 42".to_vec()))).await;
        let err = fetch(&url, TEST_TIMEOUT).await.unwrap_err();
        assert!(err.contains("not THIM's JSON"), "{err}");
    }

    #[tokio::test]
    async fn thim_fetch_refuses_malformed_pem() {
        let mut broken = pem_of(VCEK_DER);
        broken.replace_range(40..44, "!!!!");
        let body = serde_json::json!({ "vcekCert": broken, "certificateChain": "" }).to_string();
        let url = serve(Some((200, body.into_bytes()))).await;
        let err = fetch(&url, TEST_TIMEOUT).await.unwrap_err();
        assert!(err.contains("vcekCert certificate 1 is not PEM"), "{err}");

        let not_x509 = serde_json::json!({ "vcekCert": pem_of(b"not a certificate") }).to_string();
        let err = parse(not_x509.as_bytes()).unwrap_err();
        assert!(err.contains("is not X.509"), "{err}");

        let two = serde_json::json!({ "vcekCert": pem_of(VCEK_DER).repeat(2) }).to_string();
        assert_eq!(parse(two.as_bytes()).unwrap_err(), "vcekCert holds 2 certificates, not one");
    }

    #[tokio::test]
    async fn thim_fetch_gives_up_after_its_timeout() {
        let url = serve(None).await;
        let started = std::time::Instant::now();
        let err = fetch(&url, Duration::from_millis(200)).await.unwrap_err();
        assert!(err.contains("did not answer within 200 ms"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn thim_fetch_refuses_a_bad_url() {
        let err = fetch("not a url", TEST_TIMEOUT).await.unwrap_err();
        assert!(err.contains("not a valid URI"), "{err}");
    }
}
