//! `cloister sandbox` as an operator runs it: a child process that comes up, writes
//! `sandbox.json`, answers with the credentials it printed, stops cleanly on Ctrl-C, and resumes.

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cloister_client::Client;
use cloister_crypto::identity;
use cloister_tests::ports::free_ports;
use serde_json::Value;

/// Three consecutive free ports on 127.0.0.1 (HTTPS, gRPC and peers of node 0).
fn free_port_triple() -> u16 {
    free_ports(3)
}

/// The sandbox process; a failing test still stops it (and, through it, its nodes).
struct Sandbox(Child);

impl Drop for Sandbox {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `cloister sandbox` to its end, for the runs that stop at once with an error.
fn sandbox_command(dir: &std::path::Path, port: u16, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cloister-test-cli"))
        .args(["sandbox", "--dir"])
        .arg(dir)
        .args(["--port", &port.to_string()])
        .args(extra)
        .output()
        .expect("the sandbox runs")
}

/// Starts the sandbox and waits for it to say it is running.
fn start(dir: &std::path::Path, port: u16) -> Sandbox {
    start_with(dir, port, &[])
}

fn start_with(dir: &std::path::Path, port: u16, extra: &[&str]) -> Sandbox {
    let child = Command::new(env!("CARGO_BIN_EXE_cloister-test-cli"))
        .args(["sandbox", "--dir"])
        .arg(dir)
        .args(["--port", &port.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the sandbox starts");
    let mut child = Sandbox(child);
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(line) => {
                let done = line.contains("grpcurl");
                printed.push(line);
                if done {
                    break;
                }
            }
            Err(e) => panic!("the sandbox did not come up ({e}); it printed:\n{}", printed.join("\n")),
        }
    }
    let text = printed.join("\n");
    assert!(text.contains("Cloister sandbox is running"), "{text}");
    assert!(text.contains("curl") && text.contains("call --sandbox"), "it prints ready-to-paste commands: {text}");
    child
}

fn interrupt(sandbox: &mut Sandbox) {
    let child = &mut sandbox.0;
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) with a valid signal, on our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "the sandbox exits cleanly on Ctrl-C: {status}");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("the sandbox did not stop within 30 s of Ctrl-C");
}

fn alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

async fn party_client(sandbox: &Value, name: &str) -> Client {
    let party = sandbox["parties"].as_array().unwrap().iter().find(|p| p["name"] == name).expect("party listed");
    let id =
        identity::read_pair(party["cert"].as_str().unwrap().as_ref(), party["key"].as_str().unwrap().as_ref()).unwrap();
    // The sandbox prints the service identity as what clients pin, not the operator's CA.
    let service_cert = std::path::PathBuf::from(sandbox["service_cert"].as_str().unwrap());
    let ca = std::fs::read(service_cert.with_file_name("service_identity.pem")).unwrap();
    Client::connect(sandbox["rest_url"].as_str().unwrap(), &ca, Some(&id))
        .await
        .expect("connects with the printed credentials")
}

fn read_sandbox(dir: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("sandbox.json")).expect("sandbox.json written")).unwrap()
}

/// Once a sandbox of three nodes prints its usage, every node answers a client that pins
/// `service_identity.pem`, as the usage says to, on both client ports: a follower serves the
/// operator's certificate until its endorsement has applied there, which can come later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_of_a_sandbox_serves_the_service_identity_once_it_is_up() {
    let dir = tempfile::tempdir().unwrap();
    let _sandbox = start_with(dir.path(), free_ports(9), &["--nodes", "3"]);
    let file = read_sandbox(dir.path());
    let identity = std::fs::read(dir.path().join("service_identity.pem")).unwrap();
    let nodes = file["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for node in nodes {
        let rest = node["rest_url"].as_str().unwrap();
        let client = Client::connect(rest, &identity, None).await.unwrap_or_else(|e| panic!("{rest}: {e:#}"));
        assert_eq!(client.get("/node/health").await.unwrap().status, 200);
        let grpc = node["grpc_url"].as_str().unwrap();
        cloister_client::grpc_channel(grpc, &identity, None).await.unwrap_or_else(|e| panic!("{grpc}: {e:#}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_runs_answers_stops_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_triple();
    // A setting the node configuration does not have is refused before any node starts.
    let out = sandbox_command(dir.path(), port, &["--set", "raft.apply_durable_mss=250"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("apply_durable_mss"), "{stderr}");
    assert!(!dir.path().join("sandbox.json").exists(), "no sandbox was made");
    let mut sandbox = start_with(dir.path(), port, &["--set", "raft.apply_durable_ms=250"]);
    let node0 = std::fs::read_to_string(dir.path().join("node0.toml")).unwrap();
    assert!(node0.contains("apply_durable_ms = 250"), "the setting is in the node's file:\n{node0}");

    let file = read_sandbox(dir.path());
    assert_eq!(file["rest_url"], format!("https://127.0.0.1:{port}"));
    assert_eq!(file["grpc_url"], format!("https://127.0.0.1:{}", port + 1));
    assert_eq!(file["parties"].as_array().unwrap().len(), 3);
    let node = &file["nodes"][0];
    let pid = node["pid"].as_u64().expect("node pid");
    assert!(alive(pid), "the node runs as its own process");
    for key in ["id", "rest_url", "grpc_url", "data_dir"] {
        assert!(node.get(key).is_some(), "sandbox.json lists the node's {key}");
    }

    // The service identity that receipts verify against, as the service itself reports it.
    let identity = std::fs::read_to_string(dir.path().join("service_identity.pem")).expect("service_identity.pem");
    let member0 = party_client(&file, "member0").await;
    let service = member0.get("/gov/service").await.unwrap().json().unwrap();
    assert_eq!(service["identity"].as_str(), Some(identity.as_str()));
    let csv = std::fs::read(dir.path().join("demo/member0_data.csv")).expect("demo data written");
    let ingest = member0.post("/app/csv/ingest", "text/csv", csv).await.unwrap();
    assert_eq!(ingest.status, 200, "{}", String::from_utf8_lossy(&ingest.body));
    let report = member0.get("/app/report").await.unwrap();
    assert_eq!(report.status, 200);
    let rows = report.json().unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 10);
    drop(member0);

    // The members govern from the command line.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cloister-test-cli"))
            .args(args)
            .arg("--sandbox")
            .arg(dir.path())
            .output()
            .expect("the CLI runs");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str::<Value>(&stdout).expect("the CLI prints JSON")
    };
    let filed = cli(&[
        "gov",
        "propose",
        "--as",
        "member0",
        "--action",
        "set_recovery_threshold",
        "--args",
        r#"{"threshold": 2}"#,
    ]);
    let id = filed["proposal_id"].as_str().unwrap().to_owned();
    assert_eq!(cli(&["gov", "vote", &id, "--approve", "--as", "member0"])["state"], "Open");
    assert_eq!(cli(&["gov", "vote", &id, "--approve", "--as", "member1"])["state"], "Accepted");
    assert_eq!(cli(&["gov", "show", &id])["ballots"].as_object().unwrap().len(), 2);
    let wasm = dir.path().join("reconcile.wasm");
    let deploy = cli(&["app", "deploy", wasm.to_str().unwrap(), "--as", "member2"]);
    assert_eq!(deploy["state"], "Open");
    let listed = cli(&["gov", "list"])["proposals"].as_array().unwrap().len();
    assert_eq!(listed, 3, "opening, threshold, deploy");
    assert_eq!(
        cli(&["gov", "withdraw", deploy["proposal_id"].as_str().unwrap(), "--as", "member2"])["state"],
        "Withdrawn"
    );

    // A running node's state database is not compacted under it; a stopped one's is, and the
    // sandbox resumes on it below.
    let compact = || {
        Command::new(env!("CARGO_BIN_EXE_cloister-test-cli"))
            .args(["node", "compact", "--config"])
            .arg(dir.path().join("node0.toml"))
            .output()
            .expect("the CLI runs")
    };
    let refused = compact();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("stop its node first"), "{stderr}");

    interrupt(&mut sandbox);
    assert!(!alive(pid), "Ctrl-C stops the node too");
    let out = compact();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("compacted"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));

    // A second run resumes on the same (compacted) state, and its files' settings: `--set` is
    // for a new one.
    let out = sandbox_command(dir.path(), port, &["--set", "raft.apply_durable_ms=500"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--set applies to a new sandbox"), "{stderr}");
    let mut sandbox = start(dir.path(), port);
    let file = read_sandbox(dir.path());
    let again = party_client(&file, "member0").await.get("/app/report").await.unwrap();
    assert_eq!(again.json().unwrap(), rows);
    interrupt(&mut sandbox);

    // The README's recovery drill: every node's data is lost but a copy of one ledger folder;
    // `sandbox --recover` brings the service back with the parties' shares, under a new identity.
    let saved = dir.path().join("saved-ledger");
    std::fs::create_dir(&saved).unwrap();
    for file in std::fs::read_dir(dir.path().join("data/node0/ledger")).unwrap() {
        let path = file.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, saved.join(path.file_name().unwrap())).unwrap();
        }
    }
    let old_identity = std::fs::read(dir.path().join("service_identity.pem")).unwrap();
    std::fs::rename(dir.path().join("data"), dir.path().join("lost-data")).unwrap();
    // Run as before, it does not quietly start a new service over the one it lost (whose
    // identity it would overwrite, leaving nothing for a --recover to check the shares against).
    let out = sandbox_command(dir.path(), port, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("its data folder is gone"), "{stderr}");
    assert_eq!(std::fs::read(dir.path().join("service_identity.pem")).unwrap(), old_identity);
    let mut sandbox = start_with(dir.path(), port, &["--recover", saved.to_str().unwrap()]);
    let file = read_sandbox(dir.path());
    let recovered = party_client(&file, "member0").await.get("/app/report").await.unwrap();
    assert_eq!(recovered.json().unwrap(), rows, "the recovered service answers the same report");
    assert_ne!(std::fs::read(dir.path().join("service_identity.pem")).unwrap(), old_identity);
    assert!(!dir.path().join("service_identity.previous.pem").exists(), "set aside only until the recovery");
    interrupt(&mut sandbox);

    // A sandbox.json that does not parse stops the command; nothing is regenerated over the
    // identities the service was created with.
    let member0_cert = std::fs::read(dir.path().join("member0.cert.pem")).unwrap();
    let service_cert = std::fs::read(dir.path().join("service.cert.pem")).unwrap();
    std::fs::write(dir.path().join("sandbox.json"), b"{ not json").unwrap();
    let out = sandbox_command(dir.path(), port, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a damaged sandbox.json is an error: {stderr}");
    assert!(stderr.contains("sandbox.json is not a sandbox file"), "the error names the file: {stderr}");
    assert_eq!(std::fs::read(dir.path().join("member0.cert.pem")).unwrap(), member0_cert, "member0 kept");
    assert_eq!(std::fs::read(dir.path().join("service.cert.pem")).unwrap(), service_cert, "service CA kept");
}

/// The README's banking demo, command for command: the sandbox votes the users in; a bank opens
/// accounts and deposits; user0 transfers to user1; the receipt proves the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_banking_sandbox_runs_the_readme_demo() {
    let dir = tempfile::tempdir().unwrap();
    let mut sandbox = start_with(dir.path(), free_port_triple(), &["--app", "banking"]);
    let id = |name: &str| std::fs::read_to_string(dir.path().join(format!("{name}.id"))).unwrap();
    let (u0, u1) = (id("user0"), id("user1"));
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cloister-test-cli")).args(args).output().expect("the CLI runs");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{args:?}: {stdout}{stderr}");
        (stdout.into_owned(), stderr.into_owned())
    };
    let sandbox_dir = dir.path().to_str().unwrap();
    let call = |who: &str, rest: &[&str]| cli(&[&["call", "--sandbox", sandbox_dir, "--as", who], rest].concat());
    call("member1", &["PUT", &format!("/app/account/{u0}/current")]);
    call("member1", &["PUT", &format!("/app/account/{u1}/current")]);
    call("member1", &["POST", &format!("/app/deposit/{u0}/current"), "--data", r#"{"value": 100}"#]);
    let transfer = format!(r#"{{"value": 40, "user_id_to": "{u1}", "account_name_to": "current"}}"#);
    let (answer, status) = call("user0", &["POST", "/app/transfer/current", "--data", &transfer]);
    assert_eq!(call("user0", &["GET", "/app/balance/current"]).0.trim(), r#"{"balance":60}"#);
    assert_eq!(call("user1", &["GET", "/app/balance/current"]).0.trim(), r#"{"balance":40}"#);
    let tx = status.split(" tx ").nth(1).expect("the transfer names its transaction").trim().to_owned();
    let claim = serde_json::from_str::<Value>(&answer).unwrap()["claim"].as_str().unwrap().to_owned();
    let receipt = dir.path().join("receipt.json");
    for _ in 0..50 {
        let (body, status) = call("user0", &["GET", &format!("/app/receipt?id={tx}")]);
        if status.starts_with("HTTP 200") {
            std::fs::write(&receipt, body).unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let identity = dir.path().join("service_identity.pem");
    let (verified, _) = cli(&[
        "receipt",
        "verify",
        receipt.to_str().unwrap(),
        "--service-cert",
        identity.to_str().unwrap(),
        "--claim",
        &claim,
    ]);
    assert!(verified.contains("which is the claim's"), "{verified}");
    interrupt(&mut sandbox);
}

/// A child process stopped when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// chromedriver in a process group of its own, with the browsers it starts: the whole group is
/// killed when the test ends, so no Chromium outlives a failed test.
struct BrowserGroup(Child);

impl Drop for BrowserGroup {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill(2) on the process group this test made for its own child.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.0.wait();
    }
}

/// Starts `cloister console` for a sandbox party and returns its login URL.
fn start_console(dir: &std::path::Path, party: &str) -> (Killed, String) {
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_cloister-test-cli"))
            .args(["console", "--sandbox"])
            .arg(dir)
            .args(["--as", party])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the console starts"),
    );
    let mut line = String::new();
    std::io::BufReader::new(child.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url =
        line.trim().strip_prefix("console: ").unwrap_or_else(|| panic!("the console printed {line:?}")).to_owned();
    (child, url)
}

/// Where the console test leaves its screenshots: `target/console-screenshots/`.
fn screenshot_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).expect("target/<profile>/deps/<test>").to_owned();
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits until the page's source contains `needle`, reloading it meanwhile if asked.
async fn wait_for_text(browser: &fantoccini::Client, needle: &str, reload: bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let source = browser.source().await.unwrap();
        if source.contains(needle) {
            return source;
        }
        assert!(std::time::Instant::now() < deadline, "the page never showed {needle:?}:\n{source}");
        tokio::time::sleep(Duration::from_millis(250)).await;
        if reload {
            browser.refresh().await.unwrap();
        }
    }
}

/// The members' console in a real browser (headless Chromium through chromedriver): every page
/// renders what the service holds, a proposal filed from the form and approved with the buttons
/// of two members' consoles is Accepted, an uploaded CSV's rows are in the report, and a
/// receipt verifies. Screenshots of each page go to `target/console-screenshots/`.
///
/// Without chromedriver on PATH it says so and passes, unless CLOISTER_REQUIRE_BROWSER is set
/// (`.ci/run` sets it, and installs Debian's chromium and chromium-driver).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser_shows_the_service_and_acts_for_its_member() {
    use fantoccini::Locator;
    let driver_path = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("chromedriver")).find(|d| d.exists()));
    let Some(driver_path) = driver_path else {
        assert!(
            std::env::var_os("CLOISTER_REQUIRE_BROWSER").is_none(),
            "CLOISTER_REQUIRE_BROWSER is set but chromedriver is not on PATH (apt-get install chromium chromium-driver)"
        );
        eprintln!("SKIPPED: chromedriver is not on PATH; apt-get install chromium chromium-driver to run this test");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_triple();
    let mut sandbox = start(dir.path(), port);
    let (_console0, login0) = start_console(dir.path(), "member0");
    let (_console1, login1) = start_console(dir.path(), "member1");
    let base0 = login0.split("/login").next().unwrap().to_owned();
    let base1 = login1.split("/login").next().unwrap().to_owned();

    let driver_port = free_ports(1);
    let _driver = BrowserGroup(
        Command::new(driver_path)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts"),
    );
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"] }),
    );
    let mut browser = None;
    for _ in 0..100 {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match fantoccini::ClientBuilder::new(connector)
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
        {
            Ok(b) => {
                browser = Some(b);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let browser = browser.expect("chromedriver answers within 20 s");
    let shots = screenshot_dir();
    let shoot = |name: &'static str| {
        let (browser, shots) = (browser.clone(), shots.clone());
        async move {
            let png = browser.screenshot().await.unwrap();
            std::fs::write(shots.join(format!("{name}.png")), png).unwrap();
        }
    };

    // Service: the state, and the fingerprint of the identity the sandbox pins.
    browser.goto(&login0).await.unwrap();
    let pinned = std::fs::read(dir.path().join("service_identity.pem")).unwrap();
    let fingerprint = identity::id_of_pem(&pinned).unwrap();
    let source = wait_for_text(&browser, "Open", false).await;
    assert!(source.contains(&fingerprint), "the service certificate's fingerprint is shown");
    assert!(source.contains("Constitution (blake3)") && source.contains("/csv/ingest"), "{source}");
    shoot("service").await;

    // Nodes: the node, its role and its attestation.
    browser.goto(&format!("{base0}/nodes")).await.unwrap();
    let source = wait_for_text(&browser, "node0", false).await;
    for needle in ["leader", "Trusted", "mock"] {
        assert!(source.contains(needle), "the nodes page shows {needle}: {source}");
    }
    shoot("nodes").await;

    // Reconciliation: upload the demo CSV and find its rows in the report.
    let csv_path = dir.path().join("demo/member0_data.csv");
    let keys: Vec<String> = std::fs::read_to_string(&csv_path)
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next().map(str::to_owned))
        .collect();
    browser.goto(&format!("{base0}/reconcile")).await.unwrap();
    browser.find(Locator::Id("file")).await.unwrap().send_keys(csv_path.to_str().unwrap()).await.unwrap();
    browser.find(Locator::Id("upload")).await.unwrap().click().await.unwrap();
    wait_for_text(&browser, "id=\"done\"", false).await;
    shoot("upload").await;
    browser.goto(&format!("{base0}/reconcile")).await.unwrap();
    let report = browser.find(Locator::Id("report")).await.unwrap().text().await.unwrap();
    for key in &keys {
        assert!(report.contains(key.as_str()), "the report lists {key}: {report}");
    }
    assert!(browser.source().await.unwrap().contains("NOT_ENOUGH_DATA"), "the chart names each status");
    shoot("reconciliation").await;
    browser.find(Locator::LinkText(&keys[0])).await.unwrap().click().await.unwrap();
    let record = browser.find(Locator::Id("record")).await.unwrap().text().await.unwrap();
    assert!(record.contains(&keys[0]) && record.contains("group_status"), "one record's detail: {record}");

    // Proposals: member0 proposes a user from the form and approves; member1 approves too.
    let user = identity::generate_identity("console-user").unwrap();
    let args = serde_json::json!({ "cert": user.cert_pem }).to_string();
    browser.goto(&format!("{base0}/proposals/new")).await.unwrap();
    browser.find(Locator::Css("select[name=action] option[value=set_user]")).await.unwrap().click().await.unwrap();
    let textarea = browser.find(Locator::Css("textarea[name=args]")).await.unwrap();
    textarea.clear().await.unwrap();
    textarea.send_keys(&args).await.unwrap();
    browser.find(Locator::Css("form[action='/proposals'] button")).await.unwrap().click().await.unwrap();
    let source = wait_for_text(&browser, "Your ballot", false).await;
    assert!(
        source.contains(&format!("certificate with id {}", user.id().unwrap())),
        "the action reads as the certificate's id"
    );
    let proposal_path = browser.current_url().await.unwrap().path().to_owned();
    browser.find(Locator::Id("approve")).await.unwrap().click().await.unwrap();
    wait_for_text(&browser, "badge ok\">Approve", false).await;
    browser.goto(&login1).await.unwrap();
    browser.goto(&format!("{base1}{proposal_path}")).await.unwrap();
    browser.find(Locator::Id("approve")).await.unwrap().click().await.unwrap();
    let source = wait_for_text(&browser, ">Accepted<", false).await;
    assert!(!source.contains("Your ballot"), "an Accepted proposal takes no more ballots");
    shoot("proposal").await;
    // member1 files a proposal from its console and withdraws it; member0 could only have voted.
    browser.goto(&format!("{base1}/proposals/new")).await.unwrap();
    browser
        .find(Locator::Css("select[name=action] option[value=set_app_config]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let textarea = browser.find(Locator::Css("textarea[name=args]")).await.unwrap();
    textarea.clear().await.unwrap();
    textarea.send_keys(r#"{"config": {"threshold": 2}}"#).await.unwrap();
    browser.find(Locator::Css("form[action='/proposals'] button")).await.unwrap().click().await.unwrap();
    wait_for_text(&browser, "Your ballot", false).await;
    let withdrawn_path = browser.current_url().await.unwrap().path().to_owned();
    browser.find(Locator::Id("reject")).await.unwrap().click().await.unwrap();
    wait_for_text(&browser, "badge bad\">Reject", false).await;
    browser.find(Locator::Id("withdraw")).await.unwrap().click().await.unwrap();
    wait_for_text(&browser, ">Withdrawn<", false).await;
    browser.goto(&format!("{base0}{withdrawn_path}")).await.unwrap();
    let source = wait_for_text(&browser, ">Withdrawn<", false).await;
    assert!(!source.contains("id=\"withdraw\""), "only the proposer may withdraw, and only while Open");
    browser.goto(&format!("{base1}/proposals")).await.unwrap();
    let source = wait_for_text(&browser, "set_user", false).await;
    assert!(source.contains("set_app_config") && source.contains(">Withdrawn<"), "{source}");
    shoot("proposals").await;

    // Ledger: a receipt for a write, verified in the console against the pinned identity.
    let file = read_sandbox(dir.path());
    let member0 = party_client(&file, "member0").await;
    let written = member0
        .post("/app/ingest", "application/json", r#"{"lei":"CONSOLE0000000000001","nace":"A.01"}"#)
        .await
        .unwrap();
    assert_eq!(written.status, 200, "{}", written.text());
    let tx = written.tx_id().unwrap();
    browser.goto(&format!("{base0}/ledger?tx={tx}")).await.unwrap();
    wait_for_text(&browser, "receipt-ok", true).await;
    shoot("ledger").await;

    // Without the cookie, nothing: another browser session gets the refusal.
    browser.delete_all_cookies().await.unwrap();
    browser.goto(&format!("{base0}/proposals")).await.unwrap();
    assert!(browser.source().await.unwrap().contains("access token"));

    browser.close().await.unwrap();
    interrupt(&mut sandbox);
}
