//! `cloister console`: a members' web console on 127.0.0.1, speaking to the service with the
//! member's own identity. The key stays in this process: the browser gets server-rendered HTML
//! and posts forms, and the console signs every governance request itself.
//!
//! Who may use it: whoever holds the access token the console prints at start. Opening the
//! printed URL sets it as an `HttpOnly`, `SameSite=Strict` cookie; every other request needs
//! that cookie, so another local user or a web page in the same browser cannot act as the member.
//! The console is addressed by a name of its own, `c<random>.localhost:PORT` (browsers resolve
//! `*.localhost` to the loopback address themselves): browsers send a host's cookies to all of its
//! ports, so under `127.0.0.1` any local user's server there, opened in the member's browser,
//! received the cookie. Forms also carry a token derived from it, requests whose `Host` or
//! `Origin` is not the console's own, or that the browser marks as sent from another site, are
//! refused (DNS rebinding, cross-site posts), and no page may be framed (clickjacking).

mod pages;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde_json::Value;

use super::call::{Resolved, Target};
use super::ingest::{self, Nodes};
use cloister_client::Reply;
use cloister_crypto::identity::KeyedCert;

/// The cookie that carries the access token, named with the console's port: browsers share
/// cookies between ports of one host, and two consoles (two members) must not share theirs.
fn cookie_name(host: &str) -> String {
    format!("cloister_console_{}", host.rsplit(':').next().unwrap_or_default())
}
/// How long one request to the service may take before the console gives up on it.
pub const SERVICE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest file the upload form takes.
pub const UPLOAD_BYTES_MAX: usize = 512 << 20;

#[derive(clap::Args)]
pub struct Args {
    /// The port to serve on, on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    #[command(flatten)]
    target: Target,
}

/// The console's state: how to reach the service, as whom, and the uploads under way.
pub(crate) struct Console {
    nodes: tokio::sync::Mutex<Nodes>,
    pub me: KeyedCert,
    pub my_id: String,
    /// What the member pins (PEM): the service identity, which TLS to every node and receipts
    /// are checked against.
    pub pinned: Vec<u8>,
    token: String,
    /// `c<random>.localhost:PORT`, the only `Host` the console answers ([`console_host`]).
    host: String,
    pub jobs: Mutex<HashMap<u64, Arc<Mutex<pages::Job>>>>,
    next_job: AtomicU64,
    pub uploads: tempfile::TempDir,
    /// How long connecting to a node, and then one request, may take ([`SERVICE_TIMEOUT`]).
    service_timeout: Duration,
}

/// An error page: the status and what went wrong, in words.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: StatusCode,
    pub message: String,
}

impl Failure {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure { status, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::new(StatusCode::BAD_GATEWAY, format!("{e:#}"))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, pages::failure(self.status, &self.message)).into_response()
    }
}

/// A service answer that is not 2xx, as a failure naming the service's own message.
pub(crate) fn refused(what: &str, reply: &Reply) -> Failure {
    let message = reply.json().ok().and_then(|b| b["error"]["message"].as_str().map(str::to_owned));
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    Failure::new(status, format!("{what}: {}", message.unwrap_or_else(|| reply.text())))
}

impl Console {
    /// Sends a request to the service. A read, or a write that never left the console, moves to
    /// another node once if the one in use is gone or slow. A write that may have reached a node
    /// is not sent again: it may have been applied, and a governance request sent twice is
    /// refused as a replay, which would hide from the member that the first one counted.
    pub async fn request(
        &self,
        method: &str,
        target: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Reply, Failure> {
        let read = matches!(method, "GET" | "HEAD");
        let no_answer = || anyhow::anyhow!("no answer within {} s", self.service_timeout.as_secs_f64());
        let mut last = None;
        for _ in 0..2 {
            let connected =
                tokio::time::timeout(self.service_timeout, async { self.nodes.lock().await.client().await });
            let failure = match connected.await {
                Ok(Ok(client)) => {
                    let sent = client.request(method, target, content_type, body.clone());
                    match tokio::time::timeout(self.service_timeout, sent).await {
                        Ok(Ok(reply)) => return Ok(reply),
                        Ok(Err(e)) if read || cloister_client::not_sent(&e) => e,
                        Ok(Err(e)) => return self.outcome_unknown(method, target, e).await,
                        Err(_) if read => no_answer(),
                        Err(_) => return self.outcome_unknown(method, target, no_answer()).await,
                    }
                }
                Ok(Err(e)) => e,
                Err(_) => no_answer().context("connecting"),
            };
            last = Some(failure);
            self.nodes.lock().await.next();
        }
        Err(last.expect("a failed attempt left its error").context("the service cannot be reached").into())
    }

    /// The failure of a write that may have reached the service; the next request goes to
    /// another node.
    async fn outcome_unknown(&self, method: &str, target: &str, e: anyhow::Error) -> Result<Reply, Failure> {
        self.nodes.lock().await.next();
        Err(Failure::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "{method} {target} reached the service but no answer came back ({e:#}): it may have been applied. \
                 Look before sending it again (a proposal or vote: the Proposals page)."
            ),
        ))
    }

    /// A GET whose answer must be 2xx JSON.
    pub async fn get_json(&self, target: &str) -> Result<Value, Failure> {
        let reply = self.request("GET", target, None, Vec::new()).await?;
        if !(200..300).contains(&reply.status) {
            return Err(refused(&format!("GET {target}"), &reply));
        }
        Ok(reply.json()?)
    }

    /// Signs a governance request as this member and sends it; the answer's JSON if 200.
    pub async fn gov(&self, write: &cloister_crypto::cose::GovWrite, payload: &Value) -> Result<Value, Failure> {
        // Signed for the service the node serves now (a recovery gives it a new identity), once
        // the node shows a certificate from that service's identity (`Client::service_id`).
        let mut last = None;
        for _ in 0..2 {
            // The client is taken out of the lock first: other requests do not wait behind this
            // one's network round trips.
            let named = async {
                let client = self.nodes.lock().await.client().await?;
                client.service_id().await
            };
            match tokio::time::timeout(self.service_timeout, named).await {
                Ok(Ok(service)) => return self.signed(write, payload, &service).await,
                Ok(Err(e)) => last = Some(format!("{e:#}")),
                Err(_) => last = Some(format!("no answer within {} s", self.service_timeout.as_secs_f64())),
            }
            self.nodes.lock().await.next();
        }
        let why = last.unwrap_or_default();
        // As any request the service did not answer well: a node that serves no certificate from
        // the identity it names is no better an answer than none.
        Err(Failure::new(StatusCode::BAD_GATEWAY, format!("asking the service which service to sign for: {why}")))
    }

    /// Signs a governance request for `service` as this member and sends it.
    async fn signed(
        &self,
        write: &cloister_crypto::cose::GovWrite,
        payload: &Value,
        service: &str,
    ) -> Result<Value, Failure> {
        let created_at = cloister_client::next_created_at(&self.my_id);
        let signed = cloister_client::sign_gov(&self.me, write, payload, created_at, service)
            .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, format!("signing failed: {e:#}")))?;
        let reply = self.request("POST", &write.path(), Some(cloister_client::COSE_CONTENT_TYPE), signed).await?;
        if reply.status != 200 {
            return Err(refused(&format!("POST {}", write.path()), &reply));
        }
        Ok(reply.json()?)
    }

    /// The token a form carries: derived from the access token, so a page that cannot read the
    /// cookie cannot forge it.
    pub fn form_token(&self) -> String {
        blake3::keyed_hash(&blake3::hash(self.token.as_bytes()).into(), b"cloister console form").to_hex().to_string()
    }

    /// Checks the `csrf` field of a posted form.
    pub fn check_form(&self, form: &HashMap<String, String>) -> Result<(), Failure> {
        self.check_form_token(form.get("csrf").map(String::as_str).unwrap_or_default())
    }

    pub fn check_form_token(&self, given: &str) -> Result<(), Failure> {
        if constant_time_eq(given.as_bytes(), self.form_token().as_bytes()) {
            Ok(())
        } else {
            Err(Failure::new(StatusCode::FORBIDDEN, "the form's token is missing or wrong: reload the page and retry"))
        }
    }

    /// Starts tracking a new upload job.
    pub fn add_job(&self, job: pages::Job) -> (u64, Arc<Mutex<pages::Job>>) {
        let id = self.next_job.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Mutex::new(job));
        self.jobs.lock().expect("jobs lock").insert(id, job.clone());
        (id, job)
    }

    /// A fresh set of nodes to ingest through (an upload runs beside the pages' requests).
    pub async fn ingest_nodes(&self) -> Nodes {
        let nodes = self.nodes.lock().await;
        Nodes::new(nodes.urls().to_vec(), self.pinned.clone(), Some(self.me.clone()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of one cookie.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The console's address: a name of its own under `localhost`, so that its cookie is sent to it
/// alone, not to every server on the loopback address.
fn console_host(port: u16) -> String {
    format!("c{}.localhost:{port}", hex::encode(cloister_crypto::random_bytes::<8>()))
}

/// What every answer says about how a browser may use it: no framing by any page
/// (clickjacking), nothing loaded from elsewhere, forms posted only back here, and no address
/// (a proposal's, a record's key) sent to another site as a referrer.
const SECURITY_HEADERS: [(header::HeaderName, &str); 3] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
    ),
    (header::X_FRAME_OPTIONS, "DENY"),
    // Not `no-referrer`: under it a browser sends `Origin: null` with a form's post, which the
    // origin check refuses.
    (header::REFERRER_POLICY, "same-origin"),
];

/// Refuses what is not for this console, and marks every answer with [`SECURITY_HEADERS`].
async fn guard(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    let mut response = admit(&console, request, next).await;
    for (name, value) in SECURITY_HEADERS {
        response.headers_mut().insert(name, header::HeaderValue::from_static(value));
    }
    response
}

/// Refuses another `Host` (DNS rebinding), another `Origin` or a request the browser says
/// another site sent (cross-site posts), and no access cookie (anyone but the member's browser).
async fn admit(console: &Console, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let host_ok = headers.get(header::HOST).and_then(|h| h.to_str().ok()).is_some_and(|h| h == console.host);
    if !host_ok {
        return Failure::new(StatusCode::MISDIRECTED_REQUEST, "this console answers only its own address")
            .into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok())
        && origin != format!("http://{}", console.host)
    {
        return Failure::new(StatusCode::FORBIDDEN, "requests from other sites are refused").into_response();
    }
    // The browser's own word on who sent it: another site's link or form, or a page of another
    // host on the same site. A typed address or a bookmark is `none`.
    if let Some(site) = headers.get("sec-fetch-site").and_then(|s| s.to_str().ok())
        && !matches!(site, "same-origin" | "none")
    {
        return Failure::new(StatusCode::FORBIDDEN, "requests from other sites are refused").into_response();
    }
    if request.uri().path() == "/login" {
        return next.run(request).await;
    }
    let authorized = cookie(headers, &cookie_name(&console.host))
        .is_some_and(|v| constant_time_eq(v.as_bytes(), console.token.as_bytes()));
    if !authorized {
        return Failure::new(
            StatusCode::UNAUTHORIZED,
            "open the address the console printed when it started (it carries the access token)",
        )
        .into_response();
    }
    next.run(request).await
}

/// `GET /login?token=…`: trades the printed token for the cookie, then shows the service.
async fn login(
    State(console): State<Arc<Console>>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let token = query.get("token").map(String::as_str).unwrap_or_default();
    if !constant_time_eq(token.as_bytes(), console.token.as_bytes()) {
        return Failure::new(StatusCode::UNAUTHORIZED, "that is not this console's access token").into_response();
    }
    let cookie = format!("{}={}; HttpOnly; SameSite=Strict; Path=/", cookie_name(&console.host), console.token);
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/login", get(login))
        .route("/", get(pages::service))
        .route("/nodes", get(pages::nodes))
        .route("/proposals", get(pages::proposals).post(pages::propose))
        .route("/proposals/new", get(pages::new_proposal))
        .route("/proposals/{id}", get(pages::proposal))
        .route("/proposals/{id}/ballot", post(pages::ballot))
        .route("/proposals/{id}/withdraw", post(pages::withdraw))
        .route("/reconcile", get(pages::reconcile))
        .route("/reconcile/upload", post(pages::upload))
        .route("/reconcile/jobs/{id}", get(pages::job))
        .route("/reconcile/records/{key}", get(pages::record))
        .route("/ledger", get(pages::ledger))
        .route("/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], pages::STYLE) }))
        .fallback(|| async { Failure::new(StatusCode::NOT_FOUND, "no such page") })
        .layer(axum::extract::DefaultBodyLimit::max(UPLOAD_BYTES_MAX))
        .layer(axum::middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Resolved { urls, ca, id } = args.target.resolve()?;
    let me = id.context("the console acts as a member: name one with --as NAME, or --cert and --key")?;
    let my_id = me.id()?;
    let (v4, v6) = bind_loopback(args.port).await?;
    let host = console_host(v4.local_addr()?.port());
    let token = hex::encode(cloister_crypto::random_bytes::<32>());
    let console = Arc::new(Console {
        nodes: tokio::sync::Mutex::new(Nodes::new(urls, ca.clone(), Some(me.clone()))),
        me,
        my_id,
        pinned: ca,
        token: token.clone(),
        host: host.clone(),
        jobs: Mutex::default(),
        next_job: AtomicU64::new(0),
        uploads: tempfile::tempdir().context("making a folder for uploads")?,
        service_timeout: SERVICE_TIMEOUT,
    });
    // The one line a script reads: where to point a browser.
    println!("console: http://{host}/login?token={token}");
    eprintln!("acting as {}; stop with Ctrl-C", console.my_id);
    let app = router(console);
    let serve_v4 = axum::serve(v4, app.clone()).with_graceful_shutdown(crate::shutdown_signal());
    match v6 {
        Some(v6) => {
            let serve_v6 = axum::serve(v6, app).with_graceful_shutdown(crate::shutdown_signal());
            tokio::try_join!(serve_v4.into_future(), serve_v6.into_future())?;
        }
        None => serve_v4.await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Times a free port is drawn again because its IPv6 loopback twin was taken.
const BIND_ATTEMPTS: usize = 16;

/// Listens on one port of 127.0.0.1 and of `[::1]` (`port`, or a free one). Browsers try
/// `*.localhost` at `::1` first and fall back to 127.0.0.1: a console on 127.0.0.1 alone left
/// `[::1]:PORT` to any local user to take, and with it the login token. Without an IPv6 loopback
/// nobody can listen there, and 127.0.0.1 alone is served.
async fn bind_loopback(port: u16) -> anyhow::Result<(tokio::net::TcpListener, Option<tokio::net::TcpListener>)> {
    use std::io::ErrorKind::{AddrInUse, AddrNotAvailable, Unsupported};
    use std::net::{Ipv4Addr, Ipv6Addr};
    for _ in 0..BIND_ATTEMPTS {
        let v4 = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .await
            .with_context(|| format!("listening on 127.0.0.1:{port}"))?;
        let chosen = v4.local_addr()?.port();
        match tokio::net::TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, chosen))).await {
            Ok(v6) => return Ok((v4, Some(v6))),
            Err(e) if matches!(e.kind(), AddrNotAvailable | Unsupported) => return Ok((v4, None)),
            Err(e) if e.kind() == AddrInUse && port == 0 => continue,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("listening on [::1]:{chosen}, where browsers reach a .localhost name first")
                });
            }
        }
    }
    anyhow::bail!("no port was free on both 127.0.0.1 and [::1] in {BIND_ATTEMPTS} tries")
}

/// Uploads run as jobs; the job page reads their progress.
pub(crate) fn spawn_upload(
    console: Arc<Console>,
    path: tempfile::TempPath,
    format: ingest::Format,
    job: Arc<Mutex<pages::Job>>,
) {
    let watched = job.clone();
    let upload = tokio::spawn(async move {
        let mut nodes = console.ingest_nodes().await;
        let mut stats = ingest::Stats::default();
        let limits = ingest::Limits::default();
        let progress = job.clone();
        let outcome = ingest::upload(&mut nodes, &path, format, &limits, 0, &mut stats, |batch, stats| {
            let mut job = progress.lock().expect("job lock");
            job.records = stats.records;
            job.bytes_done = batch.end;
            Ok(())
        })
        .await;
        let mut job = job.lock().expect("job lock");
        job.finished = Some(match outcome {
            Ok(None) => Ok(()),
            Ok(Some(refusal)) => Err(refusal.describe()),
            Err(e) => Err(format!("{e:#}")),
        });
        job.retries = stats.retries;
        drop(path);
    });
    // An upload that stopped without an outcome (a panic) still ends its job: its page would
    // otherwise say "Ingesting…" for ever.
    tokio::spawn(async move {
        if let Err(e) = upload.await {
            let mut job = watched.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            job.finished.get_or_insert_with(|| Err(format!("the upload stopped: {e}")));
            drop(job);
            watched.clear_poison();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use tower::ServiceExt;

    const HOST: &str = "127.0.0.1:40404";

    fn console() -> Arc<Console> {
        // Nothing listens there: a request that got past the checks would fail to reach it.
        console_of(vec!["https://127.0.0.1:9".into()], Vec::new(), SERVICE_TIMEOUT)
    }

    fn console_of(urls: Vec<String>, ca: Vec<u8>, service_timeout: Duration) -> Arc<Console> {
        let me = cloister_crypto::identity::generate_identity("member0").unwrap();
        Arc::new(Console {
            nodes: tokio::sync::Mutex::new(Nodes::new(urls, ca, None)),
            my_id: me.id().unwrap(),
            me,
            pinned: Vec::new(),
            token: "a".repeat(64),
            host: HOST.into(),
            jobs: Mutex::default(),
            next_job: AtomicU64::new(0),
            uploads: tempfile::tempdir().unwrap(),
            service_timeout,
        })
    }

    async fn send(console: &Arc<Console>, request: HttpRequest<Body>) -> Response {
        router(console.clone()).oneshot(request).await.unwrap()
    }

    fn get(path: &str, host: &str, cookie: Option<&str>) -> HttpRequest<Body> {
        let mut r = HttpRequest::get(path).header(header::HOST, host);
        if let Some(c) = cookie {
            r = r.header(header::COOKIE, c);
        }
        r.body(Body::empty()).unwrap()
    }

    fn authorized() -> String {
        format!("{}={}", cookie_name(HOST), "a".repeat(64))
    }

    #[tokio::test]
    async fn the_token_buys_a_strict_http_only_cookie_and_nothing_else_does() {
        let c = console();
        assert_eq!(send(&c, get("/", HOST, None)).await.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(send(&c, get("/login?token=bbbb", HOST, None)).await.status(), StatusCode::UNAUTHORIZED);
        let wrong_cookie = format!("{}={}", cookie_name(HOST), "b".repeat(64));
        assert_eq!(send(&c, get("/style.css", HOST, Some(&wrong_cookie))).await.status(), StatusCode::UNAUTHORIZED);
        // Another console's cookie (another port) does not open this one.
        let other = format!("cloister_console_1234={}", "a".repeat(64));
        assert_eq!(send(&c, get("/style.css", HOST, Some(&other))).await.status(), StatusCode::UNAUTHORIZED);

        let login = send(&c, get(&format!("/login?token={}", "a".repeat(64)), HOST, None)).await;
        assert_eq!(login.status(), StatusCode::SEE_OTHER);
        let set = login.headers()[header::SET_COOKIE].to_str().unwrap().to_owned();
        assert!(set.starts_with(&authorized()), "{set}");
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
        assert_eq!(send(&c, get("/style.css", HOST, Some(&authorized()))).await.status(), StatusCode::OK);
    }

    /// Under `127.0.0.1` the cookie went to every server on the loopback address (browsers send a
    /// host's cookies to all its ports): a local user's page there, opened in the member's
    /// browser, took it. Each console now has a name of its own.
    #[test]
    fn each_console_has_an_address_of_its_own() {
        let (a, b) = (console_host(40404), console_host(40404));
        assert_ne!(a, b);
        assert!(a.starts_with('c') && a.ends_with(".localhost:40404"), "{a}");
        assert_eq!(a.len(), "c.localhost:40404".len() + 16, "{a}");
    }

    /// Browsers reach `*.localhost` at `[::1]` first: the console holds that port too, so no
    /// other local user's server can take it (and the login) there.
    #[tokio::test]
    async fn the_console_holds_its_port_on_both_loopback_addresses() {
        let (v4, v6) = bind_loopback(0).await.unwrap();
        let port = v4.local_addr().unwrap().port();
        let taken = tokio::net::TcpListener::bind(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))).await;
        match v6 {
            Some(v6) => {
                assert_eq!(v6.local_addr().unwrap().port(), port);
                assert_eq!(taken.unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
            }
            None => assert!(taken.is_err(), "no IPv6 loopback here, so nobody can listen there"),
        }
        // A port asked for whose [::1] twin another holds is refused, not served on 127.0.0.1 alone.
        let other = tokio::net::TcpListener::bind(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))).await;
        if let Ok(other) = other {
            let port = other.local_addr().unwrap().port();
            let err = bind_loopback(port).await.unwrap_err();
            assert!(format!("{err:#}").contains("[::1]"), "{err:#}");
        }
    }

    /// A page of another site, or of another host of the same site, is refused even with the
    /// cookie; and no page may be framed, whatever the answer.
    #[tokio::test]
    async fn no_other_page_acts_through_the_console_or_frames_it() {
        let c = console();
        let mut sent = get("/style.css", HOST, Some(&authorized()));
        sent.headers_mut().insert("sec-fetch-site", header::HeaderValue::from_static("same-site"));
        assert_eq!(send(&c, sent).await.status(), StatusCode::FORBIDDEN);
        for site in ["same-origin", "none"] {
            let mut sent = get("/style.css", HOST, Some(&authorized()));
            sent.headers_mut().insert("sec-fetch-site", header::HeaderValue::from_static(site));
            assert_eq!(send(&c, sent).await.status(), StatusCode::OK, "{site}");
        }
        for answer in
            [send(&c, get("/style.css", HOST, Some(&authorized()))).await, send(&c, get("/", HOST, None)).await]
        {
            let headers = answer.headers();
            assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
            assert!(headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("frame-ancestors 'none'"));
        }
    }

    #[tokio::test]
    async fn another_host_or_origin_is_refused_even_with_the_cookie() {
        let c = console();
        // DNS rebinding: a name that resolves to 127.0.0.1 but is not the console's address.
        let rebound = send(&c, get("/style.css", "evil.example:40404", Some(&authorized()))).await;
        assert_eq!(rebound.status(), StatusCode::MISDIRECTED_REQUEST);
        let cross_site = HttpRequest::post("/proposals")
            .header(header::HOST, HOST)
            .header(header::ORIGIN, "https://evil.example")
            .header(header::COOKIE, authorized())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("action=remove_member&args=%7B%7D"))
            .unwrap();
        assert_eq!(send(&c, cross_site).await.status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn a_form_without_its_token_files_nothing() {
        let c = console();
        let post = |body: String| {
            HttpRequest::post("/proposals")
                .header(header::HOST, HOST)
                .header(header::ORIGIN, format!("http://{HOST}"))
                .header(header::COOKIE, authorized())
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap()
        };
        let forged = send(&c, post("action=remove_member&args=%7B%7D&csrf=00".into())).await;
        assert_eq!(forged.status(), StatusCode::FORBIDDEN);
        let missing = send(&c, post("action=remove_member&args=%7B%7D".into())).await;
        assert_eq!(missing.status(), StatusCode::FORBIDDEN);
        // With the right token it gets as far as the service, which is not there: so the
        // refusals above came from the token check.
        let genuine = send(&c, post(format!("action=remove_member&args=%7B%7D&csrf={}", c.form_token()))).await;
        assert_eq!(genuine.status(), StatusCode::BAD_GATEWAY);
        let bad_json = send(&c, post(format!("action=remove_member&args=%7Bnope&csrf={}", c.form_token()))).await;
        assert_eq!(bad_json.status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn a_refused_upload_leaves_no_file_behind() {
        let c = console();
        let csrf = c.form_token();
        let part = |name: &str, file: Option<&str>, body: &str| match file {
            Some(f) => {
                format!("--b\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\r\n{body}\r\n")
            }
            None => format!("--b\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{body}\r\n"),
        };
        let upload = |body: String| {
            HttpRequest::post("/reconcile/upload")
                .header(header::HOST, HOST)
                .header(header::ORIGIN, format!("http://{HOST}"))
                .header(header::COOKIE, authorized())
                .header(header::CONTENT_TYPE, "multipart/form-data; boundary=b")
                .body(Body::from(body))
                .unwrap()
        };
        let rows = "key,nace\nk1,A\n";
        let refused = [
            // Two files.
            format!(
                "{}{}{}--b--\r\n",
                part("csrf", None, &csrf),
                part("file", Some("a.csv"), rows),
                part("file", Some("b.csv"), rows)
            ),
            // A file whose format cannot be told.
            format!("{}{}--b--\r\n", part("csrf", None, &csrf), part("file", Some("a.txt"), rows)),
            // A body cut short inside the file.
            format!(
                "{}--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.csv\"\r\n\r\n{rows}",
                part("csrf", None, &csrf)
            ),
        ];
        for body in refused {
            let answer = send(&c, upload(body.clone())).await;
            assert_eq!(answer.status(), StatusCode::BAD_REQUEST, "{body}");
            let left: Vec<_> = std::fs::read_dir(c.uploads.path()).unwrap().collect();
            assert!(left.is_empty(), "{body} left {left:?}");
        }
        // The same file alone is taken (and kept for its job).
        let taken =
            send(&c, upload(format!("{}{}--b--\r\n", part("csrf", None, &csrf), part("file", Some("a.csv"), rows))))
                .await;
        assert_eq!(taken.status(), StatusCode::SEE_OTHER);
    }

    /// A receipt of another transaction than the one asked about is refused before it is
    /// verified: shown, a valid one for 2.14 read "Verified: transaction 2.14" on a lookup of 2.15.
    #[test]
    fn a_receipt_of_another_transaction_is_refused() {
        use cloister_ledger::entry::{EntryKind, LeafComponents, NodeSigner, SignaturePayload};
        use cloister_ledger::verify::{Receipt, SignatureRecord};
        let ca = cloister_crypto::identity::ServiceCa::generate("svc").unwrap();
        let node = ca.issue_node_cert("n", &["localhost".into()]).unwrap();
        let signer = NodeSigner::new(&node.cert_pem, &node.key_pem).unwrap();
        let leaf =
            LeafComponents { seqno: 14, term: 2, kind: EntryKind::App, content_digest: [1; 32], claims_digest: None };
        let receipt = Receipt {
            tx_id: "2.14".into(),
            proof: Vec::new(),
            signature: SignatureRecord {
                seqno: 15,
                term: 2,
                payload: SignaturePayload::sign(15, leaf.leaf(), [0; 32], &signer),
            },
            leaf,
            node_cert: node.cert_pem.clone(),
            endorsement: None,
            service_cert: ca.keyed.cert_pem.clone(),
            service_identity: String::new(),
        };
        let body = serde_json::to_vec(&receipt).unwrap();
        let pinned = ca.keyed.cert_pem.as_bytes();
        let other = pages::receipt_verdict(&body, pinned, "2.15".parse().unwrap()).unwrap_err();
        assert!(other.contains("receipt of transaction 2.14, not of 2.15"), "{other}");
        // Asked for 2.14, it is checked on (and fails here for want of the identity's endorsement).
        let checked = pages::receipt_verdict(&body, pinned, "2.14".parse().unwrap()).unwrap_err();
        assert!(!checked.contains("not of"), "{checked}");
    }

    /// What a stand-in node does with each request.
    #[derive(Clone, Copy)]
    enum Stand {
        Answer,
        /// Takes the request and resets its stream.
        Reset,
        /// Takes the request and never answers.
        Hang,
    }

    /// A TLS HTTP/2 server on 127.0.0.1 with a certificate from `ca`: its URL, and how many
    /// requests reached it.
    async fn stand_in(ca: &cloister_crypto::identity::ServiceCa, stand: Stand) -> (String, Arc<AtomicU64>) {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let node = ca.issue_node_cert("stand-in", &["127.0.0.1".into()]).unwrap();
        let tls =
            tokio_rustls::TlsAcceptor::from(cloister_crypto::tls::server_config(&node, &ca.keyed.cert_pem).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let reached = Arc::new(AtomicU64::new(0));
        let counter = reached.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (tls, counter) = (tls.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(conn) = tls.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |_: hyper::Request<hyper::body::Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        async move {
                            match stand {
                                Stand::Answer => Ok(hyper::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from_static(b"{}"),
                                ))),
                                Stand::Reset => Err(std::io::Error::other("reset")),
                                Stand::Hang => std::future::pending().await,
                            }
                        }
                    });
                    let serving = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(conn), service);
                    let _ = serving.await;
                });
            }
        });
        (url, reached)
    }

    #[tokio::test]
    async fn a_write_that_reached_a_node_is_not_sent_again_but_a_read_moves_on() {
        let ca = cloister_crypto::identity::ServiceCa::generate("stand-ins").unwrap();
        let pem = ca.keyed.cert_pem.as_bytes().to_vec();
        let timeout = Duration::from_millis(500);
        let (answers, answered) = stand_in(&ca, Stand::Answer).await;
        for stand in [Stand::Hang, Stand::Reset] {
            let (first, reached) = stand_in(&ca, stand).await;
            let c = console_of(vec![first, answers.clone()], pem.clone(), timeout);
            let before = answered.load(Ordering::SeqCst);
            let unknown = c.request("POST", "/gov/proposals", None, b"signed".to_vec()).await.unwrap_err();
            assert_eq!(unknown.status, StatusCode::GATEWAY_TIMEOUT, "{}", unknown.message);
            assert!(unknown.message.contains("may have been applied"), "{}", unknown.message);
            assert_eq!(reached.load(Ordering::SeqCst), 1);
            assert_eq!(answered.load(Ordering::SeqCst), before, "the write was sent again");
            // The next request goes to the other node.
            assert_eq!(c.request("GET", "/gov/service", None, Vec::new()).await.unwrap().status, 200);
            assert_eq!(reached.load(Ordering::SeqCst), 1);

            // A read that reached the first node and failed moves on to the other.
            let c = console_of(vec![stand_in(&ca, stand).await.0, answers.clone()], pem.clone(), timeout);
            assert_eq!(c.request("GET", "/gov/service", None, Vec::new()).await.unwrap().status, 200);
        }
        // A write that never left (nothing listens at the first node) goes to the other.
        let c = console_of(vec!["https://127.0.0.1:9".into(), answers.clone()], pem, timeout);
        let before = answered.load(Ordering::SeqCst);
        assert_eq!(c.request("POST", "/gov/proposals", None, b"signed".to_vec()).await.unwrap().status, 200);
        assert_eq!(answered.load(Ordering::SeqCst), before + 1);
    }
}
