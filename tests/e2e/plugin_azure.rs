//! The azure plugin against Azurite (Microsoft's Blob Storage emulator,
//! from npm) on loopback; blobs are made and checked from the store's side
//! with Microsoft's Python SDK (`azure-storage-blob`, from PyPI), data
//! read and written with libnbd's nbdcopy and nbdsh.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const CONTAINER: &str = "disks";

/// An in-memory Azurite blob service, killed on drop.
struct Azurite {
    child: Child,
    port: u16,
}

/// Is Microsoft's Python SDK importable by `python3`?
fn require_sdk() -> bool {
    if !require(&["python3", "azurite-blob"]) {
        return false;
    }
    let ok = Command::new("python3")
        .args(["-c", "import azure.storage.blob"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the Python package azure-storage-blob is missing");
        }
        eprintln!("SKIP: the Python package azure-storage-blob is not installed");
    }
    ok
}

impl Azurite {
    fn start() -> Option<Azurite> {
        if !require_sdk() {
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new("azurite-blob")
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--inMemoryPersistence", "--silent", "--skipApiVersionCheck"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start azurite-blob");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("azurite exited early: {st}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "azurite did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let a = Azurite { child, port };
        a.sdk(&format!("s.create_container({CONTAINER:?})"));
        Some(a)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// Run Python with `s` a BlobServiceClient and `c` the container's
    /// client; returns its stdout.
    fn sdk(&self, code: &str) -> String {
        let script = format!(
            "from azure.storage.blob import BlobServiceClient\n\
             s = BlobServiceClient.from_connection_string(\
             'DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};\
             BlobEndpoint={}')\n\
             c = s.get_container_client({CONTAINER:?})\n{code}\n",
            self.endpoint()
        );
        run_ok(Command::new("python3").args(["-c", &script]))
    }

    /// The blobs under `prefix/` as (chunk number, size), in order.
    fn chunks(&self, prefix: &str) -> Vec<(u64, u64)> {
        let out = self.sdk(&format!(
            "for b in c.list_blobs(name_starts_with={:?}): print(b.name, b.size)",
            format!("{prefix}/")
        ));
        let mut v: Vec<(u64, u64)> = out
            .lines()
            .map(|l| {
                let (name, size) = l.split_once(' ').unwrap();
                let n = name.rsplit('/').next().unwrap();
                (u64::from_str_radix(n, 16).unwrap(), size.parse().unwrap())
            })
            .collect();
        v.sort_unstable();
        v
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn args(a: &Azurite, key: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "azure".to_string(),
        format!("endpoint-url={}", a.endpoint()),
        format!("account={ACCOUNT}"),
        format!("access-key={KEY}"),
        format!("container={CONTAINER}"),
        format!("key={key}"),
    ]
    .into();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn serve(a: &Azurite, key: &str, extra: &[&str]) -> Server {
    let v = args(a, key, extra);
    Server::ours(&v.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn azure_chunked_disk_round_trip() {
    let Some(az) = Azurite::start() else { return };
    if !require_nbdsh() {
        return;
    }
    // A file copied in by libnbd's nbdcopy, out again by ours: equal, and
    // stored as one blob per written chunk, each of object-size.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let m = 1u64 << 20;
    let mut data = vec![0u8; 8 << 20];
    for (i, b) in data[..2 << 20].iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    data[(5 << 20) + 7] = 9;
    std::fs::write(&src, &data).unwrap();
    let srv = serve(&az, "vm/disk", &["size=8M", "object-size=1M"]);
    run_ok(Command::new("nbdcopy").arg(&src).arg(srv.uri()));
    run_ok(Command::new(our_bin("nbdcopy")).arg(srv.uri()).arg(&back));
    assert!(std::fs::read(&back).unwrap() == data, "data differs");
    assert_eq!(az.chunks("vm/disk"), vec![(0, m), (1, m), (5, m)]);

    // Zeroing a whole chunk deletes its blob; the map shows the holes.
    let out = nbdpy(
        &srv.uri(),
        "M = 1 << 20\nh.zero(M, 5 * M)\nh.flush()\nassert h.pread(M, 5 * M) == bytes(M)\nprint('ok')",
    );
    assert!(out.contains("ok"));
    assert_eq!(az.chunks("vm/disk"), vec![(0, m), (1, m)]);
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(srv.uri()));
    assert!(
        map.lines().nth(1).unwrap().contains("hole,zero"),
        "chunks 2.. should be a hole: {map}"
    );
}

#[test]
fn azure_single_blob_is_read_only() {
    let Some(az) = Azurite::start() else { return };
    if !require_nbdsh() {
        return;
    }
    az.sdk("c.get_blob_client('one.img').upload_blob(bytes(range(256)) * 4096)");
    let srv = serve(&az, "one.img", &[]);
    let out = nbdpy(
        &srv.uri(),
        "assert h.get_size() == 1 << 20\nassert h.is_read_only()\n\
         assert h.pread(300, 1000) == (bytes(range(256)) * 8)[1000 % 256:][:300]\nprint('ok')",
    );
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn azure_wrong_key_is_a_clear_error() {
    let Some(az) = Azurite::start() else { return };
    let mut v = args(&az, "d", &["size=1M", "object-size=64k"]);
    // A well-formed key that is not the account's.
    v[3] = format!("access-key={}", KEY.replace('E', "F"));
    let info = our_bin("nbdinfo");
    let out = run(Command::new(nbdkit())
        .args(["-U", "-"])
        .args(&v)
        .args(["--run", &format!("{} $uri", info.display())]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("azure:") && err.contains("403"), "{err}");
    // No credentials at all: refused before anything starts.
    let out = run(Command::new(nbdkit())
        .env_remove("AZURE_STORAGE_ACCOUNT_KEY")
        .env_remove("AZURE_STORAGE_KEY")
        .env_remove("AZURE_STORAGE_SAS_TOKEN")
        .args(["-U", "-", "azure", "account=a", "container=c", "key=k"])
        .args(["--run", "true"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no credentials"));
}
