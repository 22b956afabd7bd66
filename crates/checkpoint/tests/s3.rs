//! Checkpoints in S3-compatible storage, through `s3://` URLs, against moto's S3 server (a
//! separate process; `scripts/test.sh` installs it and names it in `RISKSTREAM_TEST_S3_SERVER`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use riskstream_checkpoint::{CheckpointStore, Checkpointer, Manifest, Staged};
use riskstream_state::{Cf, StateStore};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A raw HTTP request to the server; its status code.
fn http(port: u16, request: &str) -> Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

fn start_server() -> Result<(Server, u16)> {
    let program =
        std::env::var("RISKSTREAM_TEST_S3_SERVER").unwrap_or_else(|_| "moto_server".into());
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new(&program)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!("cannot start the S3 server `{program}` ({e}): run scripts/test.sh, or pip install 'moto[server]'")
        })?;
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    // Create the bucket once the server answers.
    loop {
        let created = http(
            port,
            "PUT /checkpoints HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        if created.is_ok_and(|s| s == 200) {
            return Ok((server, port));
        }
        if Instant::now() > deadline {
            return Err("the S3 server did not come up within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn checkpoints_round_trip_through_s3() -> Result {
    let (_server, port) = start_server()?;
    // This test binary is the only one reading these.
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"));
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    let url = "s3://checkpoints/riskstream/prod";

    let dir = tempfile::tempdir()?;
    let store = StateStore::open(&dir.path().join("state"))?;
    let checkpointer = Checkpointer::start(CheckpointStore::open(url, "pod-0")?, None, 1, false)?;
    let mut last = None;
    for round in 0..3u64 {
        let mut batch = store.batch();
        for k in 0..500u64 {
            batch.put(
                Cf::Features,
                &(k + round * 500).to_be_bytes(),
                &[round as u8; 64],
            )?;
        }
        store.write(batch)?;
        let id = checkpointer.next_id();
        let staged = dir.path().join("staging").join(id.to_string());
        store.checkpoint(&staged)?;
        let mut manifest = Manifest::new(id, "pod-0", "transactions", "at_least_once", 0);
        manifest.offsets.insert(3, 100 * (round as i64 + 1));
        checkpointer.staged(Staged {
            manifest,
            dir: staged,
            began: Instant::now(),
        });
        last = Some(checkpointer.wait(id, Duration::from_secs(30))?);
    }
    checkpointer.stop();
    let last = last.ok_or("no checkpoint")?;
    assert!(last.files_reused > 0, "{last:?}");

    let reader = CheckpointStore::open(url, "pod-0")?;
    let listed = reader.list()?;
    // One retained: the older two were collected, files and all.
    assert_eq!(listed.len(), 1, "{listed:?}");
    let referenced: std::collections::BTreeSet<String> =
        last.files.iter().map(|f| f.key.clone()).collect();
    let stored: std::collections::BTreeSet<String> = reader
        .objects()?
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !k.ends_with("manifest.json"))
        .collect();
    assert_eq!(stored, referenced);
    let restored = reader
        .restore(&dir.path().join("restored"), |_| Ok(()), |_| Ok(()))?
        .ok_or("nothing restored")?;
    assert_eq!(restored.manifest.offsets.get(&3), Some(&300));
    let copy = StateStore::open(&dir.path().join("restored"))?;
    assert_eq!(copy.count(Cf::Features)?, 1500);
    // Another instance's checkpoints live apart.
    assert!(CheckpointStore::open(url, "pod-1")?.list()?.is_empty());
    Ok(())
}
