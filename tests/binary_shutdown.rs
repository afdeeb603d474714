//! A shutdown that cannot stop a machine says so and exits non-zero: a VM left billing
//! silently is the failure this crate exists to prevent.
#![cfg(feature = "emulator")]

mod gce_support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_vmproxy");

#[tokio::test]
async fn a_machine_that_cannot_be_stopped_is_named_and_the_exit_is_non_zero() {
    let emu = gce_support::emulator().await;
    let config =
        std::env::temp_dir().join(format!("vmproxy-test-shutdown-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\n\n[[route]]\npath = \"/vm\"\nstrip_prefix = true\n\
             health_path = \"/healthz\"\n\n[route.gce]\nendpoint = \"{}\"\nzone = \"{}\"\ninstance = \"stuck\"\nport = {}\n",
            emu.compute_base(),
            gce_support::ZONE,
            gce_support::PORT
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env("GCE_METADATA_HOST", emu.metadata_host())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening addr=").nth(1) {
                let addr: String = rest
                    .chars()
                    .filter(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                let _ = addr_tx.send(addr);
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let guard = KillOnDrop(child.id());
    let addr: SocketAddr = addr_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the binary did not say where it listens")
        .parse()
        .unwrap();

    let (status, body) = get(addr, "/vm/hello").await;
    assert_eq!(status, 200, "{body}");
    // The Compute API refuses every stop from now on.
    emu.fail_next("instances.delete", 1000, 403, "forbidden");
    emu.fail_next("instances.stop", 1000, 403, "forbidden");

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    std::mem::forget(guard);
    let log = log.join().unwrap();
    let _ = std::fs::remove_file(&config);
    assert_ne!(
        exit.code(),
        Some(0),
        "exited 0 with a VM left running:\n{log}"
    );
    let left = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("LEFT RUNNING"))
        .unwrap_or_else(|| panic!("no ERROR naming the machine left running:\n{log}"));
    assert!(left.contains("stuck"), "{left}");
    assert!(
        emu.instance(gce_support::ZONE, "stuck").is_some(),
        "the VM is there, as the log says"
    );
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
    }
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "front.test")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = tx.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
