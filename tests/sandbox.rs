//! `cloister sandbox` as an operator runs it: a child process that comes up, writes
//! `sandbox.json`, answers with the credentials it printed, stops cleanly on Ctrl-C, and resumes.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cloister_client::Client;
use cloister_crypto::identity;
use serde_json::Value;

/// Three consecutive free ports on 127.0.0.1 (HTTPS, gRPC and peers of node 0).
fn free_port_triple() -> u16 {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if port < u16::MAX - 2 && free(port + 1) && free(port + 2) {
            return port;
        }
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_runs_answers_stops_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_triple();
    let mut sandbox = start(dir.path(), port);

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

    interrupt(&mut sandbox);
    assert!(!alive(pid), "Ctrl-C stops the node too");

    // A second run resumes on the same state.
    let mut sandbox = start(dir.path(), port);
    let file = read_sandbox(dir.path());
    let again = party_client(&file, "member0").await.get("/app/report").await.unwrap();
    assert_eq!(again.json().unwrap(), rows);
    interrupt(&mut sandbox);

    // A sandbox.json that does not parse stops the command; nothing is regenerated over the
    // identities the service was created with.
    let member0_cert = std::fs::read(dir.path().join("member0.cert.pem")).unwrap();
    let service_cert = std::fs::read(dir.path().join("service.cert.pem")).unwrap();
    std::fs::write(dir.path().join("sandbox.json"), b"{ not json").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cloister-test-cli"))
        .args(["sandbox", "--dir"])
        .arg(dir.path())
        .args(["--port", &port.to_string()])
        .output()
        .expect("the sandbox runs");
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
