//! `nbdinfo --map` with several contexts on one connection (each asked
//! for alone with filtered block status where the server can), and
//! `--map --offset/--length`; the client's filtered block status against
//! qemu-nbd 10, our server and a fake server that answers for a context
//! it was not asked for.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;

fn nbdinfo(args: &[&str]) -> Output {
    run(Command::new(our_bin("nbdinfo")).args(args))
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qemu_io(img: &Path, cmd: &str) {
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(img),
    );
}

/// base.qcow2 (64K of data at 0) under top.qcow2 (64K at 512K, then a
/// bitmap b0, then 64K at 768K).
fn chain(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("1M"),
    );
    qemu_io(&base, "write -P 1 0 64k");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&top),
    );
    qemu_io(&top, "write -P 2 512k 64k");
    run_ok(
        Command::new("qemu-img")
            .args(["bitmap", "--add"])
            .arg(&top)
            .arg("b0"),
    );
    qemu_io(&top, "write -P 3 768k 64k");
    top
}

const THREE_MAPS: &str = "\
context: base:allocation
         0       65536    0  data
     65536      458752    3  hole,zero
    524288       65536    0  data
    589824      196608    3  hole,zero
    786432       65536    0  data
    851968      196608    3  hole,zero
context: qemu:allocation-depth
         0       65536    2  backing depth 2
     65536      458752    0  absent
    524288       65536    1  local
    589824      196608    0  absent
    786432       65536    1  local
    851968      196608    0  absent
context: qemu:dirty-bitmap:b0
         0      786432    0  clean
    786432       65536    1  dirty
    851968      196608    0  clean
";

#[test]
fn nbdinfo_maps_three_contexts_of_qemu_nbd_with_filtered_requests() {
    if !require(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let top = top.to_str().unwrap();
    let o = nbdinfo(&[
        "--map",
        "--map=qemu:allocation-depth",
        "--map=qemu:dirty-bitmap:b0",
        "--",
        "[",
        "qemu-nbd",
        "-r",
        "-A",
        "-B",
        "b0",
        "--trace",
        "nbd_receive_request",
        "--trace",
        "nbd_co_send_extents",
        "-f",
        "qcow2",
        top,
        "]",
    ]);
    assert_eq!(ok(&o), THREE_MAPS);
    // qemu-nbd's trace: three block status requests, each the filtered
    // form (PAYLOAD_LEN, a 12-byte payload: effect length + one id), and
    // each answered for one context.
    let trace = String::from_utf8_lossy(&o.stderr);
    let requests: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains("nbd_receive_request") && l.contains(".type = 0x7"))
        .collect();
    assert_eq!(requests.len(), 3, "{trace}");
    for r in &requests {
        assert!(r.contains(".flags = 0x20") && r.contains("len = 12"), "{r}");
    }
    for id in 0..3 {
        let n = trace
            .lines()
            .filter(|l| {
                l.contains("nbd_co_send_extents") && l.contains(&format!("context = {id} "))
            })
            .count();
        assert_eq!(n, 1, "context {id}: {trace}");
    }

    // --json: one object, an array per context; --totals over a range.
    let o = nbdinfo(&[
        "--json",
        "--map",
        "--map=qemu:allocation-depth",
        "--",
        "[",
        "qemu-nbd",
        "-r",
        "-A",
        "-f",
        "qcow2",
        top,
        "]",
    ]);
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 2);
    let depth = v["qemu:allocation-depth"].as_array().unwrap();
    assert_eq!(depth[0]["type"], 2);
    assert_eq!(depth[0]["description"], "backing depth 2");
    assert_eq!(v["base:allocation"].as_array().unwrap().len(), 6);
    let o = nbdinfo(&[
        "--totals",
        "--offset=32k",
        "--length=512k",
        "--map=qemu:allocation-depth",
        "--map",
        "--",
        "[",
        "qemu-nbd",
        "-r",
        "-A",
        "-f",
        "qcow2",
        top,
        "]",
    ]);
    assert_eq!(
        ok(&o),
        "context: qemu:allocation-depth\n    458752  87.5%   0 absent\n     32768   6.2%   1 local\n     \
         32768   6.2%   2 backing depth 2\ncontext: base:allocation\n     65536  12.5%   0 data\n    \
         458752  87.5%   3 hole,zero\n"
    );
}

#[test]
fn nbdinfo_maps_our_server_with_filtered_requests() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("solo.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("1M"),
    );
    qemu_io(&img, "write -P 2 512k 64k");
    let o = nbdinfo(&[
        "--map",
        "--map=qemu:allocation-depth",
        "--",
        "[",
        nbdkit().to_str().unwrap(),
        "-v",
        "file",
        img.to_str().unwrap(),
        "--filter=qcow2",
        "]",
    ]);
    assert_eq!(
        ok(&o),
        "context: base:allocation\n         0      524288    3  hole,zero\n    524288       65536    0  \
         data\n    589824      458752    3  hole,zero\ncontext: qemu:allocation-depth\n         0      \
         524288    0  absent\n    524288       65536    1  local\n    589824      458752    0  absent\n"
    );
    let log = String::from_utf8_lossy(&o.stderr);
    let filtered = log
        .lines()
        .filter(|l| l.contains("NBD_CMD_BLOCK_STATUS flags=0x20 offset=0 count=12"))
        .count();
    assert_eq!(filtered, 2, "{log}");
    assert!(!log.contains("NBD_CMD_BLOCK_STATUS flags=0x0"), "{log}");
    // Without extended headers (--no-eh) there is no filtering: plain
    // requests, and the same maps.
    let o2 = nbdinfo(&[
        "--map",
        "--map=qemu:allocation-depth",
        "--",
        "[",
        nbdkit().to_str().unwrap(),
        "-v",
        "--no-eh",
        "file",
        img.to_str().unwrap(),
        "--filter=qcow2",
        "]",
    ]);
    assert_eq!(ok(&o2), ok(&o));
    let log = String::from_utf8_lossy(&o2.stderr);
    assert!(!log.contains("flags=0x20"), "{log}");
    assert!(log.contains("NBD_CMD_BLOCK_STATUS flags=0x0"), "{log}");
}

#[test]
fn nbdinfo_map_offset_and_length_clip_the_extents() {
    // 64K of data at 0 and at 512K of a 1M export, holes elsewhere.
    let s = Server::ours(&["data", "data=\"1\" * 65536 @524288 2 * 65536", "size=1M"]);
    let uri = s.uri();
    let map = |args: &[&str]| {
        let mut a = vec!["--map"];
        a.extend_from_slice(args);
        a.push(&uri);
        nbdinfo(&a)
    };
    assert_eq!(
        ok(&map(&["--offset=32k", "--length=512k"])),
        "     32768       32768    0  data\n     65536      458752    3  hole,zero\n    \
         524288       32768    0  data\n"
    );
    // Inside one extent; from an offset to the end; a length past it.
    assert_eq!(
        ok(&map(&["--offset=100000", "--length=1000"])),
        "    100000        1000    3  hole,zero\n"
    );
    assert_eq!(
        ok(&map(&["--offset=589824"])),
        "    589824      458752    3  hole,zero\n"
    );
    assert_eq!(
        ok(&map(&["--offset=1048000", "--length=1G"])),
        "   1048000         576    3  hole,zero\n"
    );
    assert_eq!(
        ok(&map(&["--length=64k", "--totals"])),
        "     65536 100.0%   0 data\n"
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&map(&["--json", "--offset=60k", "--length=8k"]))).unwrap();
    assert_eq!(
        v,
        serde_json::json!([
            {"offset": 61440, "length": 4096, "type": 0, "description": "data"},
            {"offset": 65536, "length": 4096, "type": 3, "description": "hole,zero"}
        ])
    );
    // The end of the export maps nothing; past it is an error.
    assert_eq!(ok(&map(&["--offset=1M"])), "");
    assert_eq!(ok(&map(&["--length=0"])), "");
    let o = map(&["--offset=1048577"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("beyond the end of the export"), "{err}");
    // Bad values, and the options without --map.
    let o = map(&["--offset=lots"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("could not parse --offset"));
    let o = nbdinfo(&["--offset=4096", &uri]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("only with --map"));
    // A context the server does not have is an error naming it.
    let o = map(&["--map=qemu:allocation-depth"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("qemu:allocation-depth"));
}

/// A fake server with extended headers and NBD_FLAG_BLOCK_STATUS_PAYLOAD
/// that selects every context asked for (ids 1, 2, ...) and answers a
/// filtered block status for the ids asked (`hostile`: for the other
/// ones instead).
fn fake_server(sock: &Path, hostile: bool) {
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || serve(c, hostile));
        }
    });
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn serve(mut c: UnixStream, hostile: bool) -> Option<()> {
    const SIZE: u64 = 1 << 20;
    let opt_reply = |c: &mut UnixStream, opt: u32, typ: u32, data: &[u8]| {
        let mut b = 0x3_e889_0455_65a9u64.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        c.write_all(&b)
    };
    let mut g = b"NBDMAGICIHAVEOPT".to_vec();
    g.extend_from_slice(&3u16.to_be_bytes());
    c.write_all(&g).ok()?;
    let mut f = [0u8; 4];
    c.read_exact(&mut f).ok()?;
    let mut ids: Vec<u32> = Vec::new();
    loop {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).ok()?;
        let opt = be32(&h[8..]);
        let mut data = vec![0u8; be32(&h[12..]) as usize];
        c.read_exact(&mut data).ok()?;
        match opt {
            11 | 8 => opt_reply(&mut c, opt, 1, &[]).ok()?,
            10 => {
                // export name, then the queries.
                let n = be32(&data) as usize;
                let mut at = 4 + n;
                let count = be32(&data[at..]);
                at += 4;
                for i in 0..count {
                    let len = be32(&data[at..]) as usize;
                    let name = &data[at + 4..at + 4 + len];
                    at += 4 + len;
                    let mut p = (i + 1).to_be_bytes().to_vec();
                    p.extend_from_slice(name);
                    opt_reply(&mut c, opt, 4, &p).ok()?;
                    ids.push(i + 1);
                }
                opt_reply(&mut c, opt, 1, &[]).ok()?;
            }
            7 => {
                // HAS_FLAGS, READ_ONLY, BLOCK_STATUS_PAYLOAD.
                let flags: u16 = 1 | 1 << 1 | 1 << 12;
                let mut p = 0u16.to_be_bytes().to_vec();
                p.extend_from_slice(&SIZE.to_be_bytes());
                p.extend_from_slice(&flags.to_be_bytes());
                opt_reply(&mut c, opt, 3, &p).ok()?;
                opt_reply(&mut c, opt, 1, &[]).ok()?;
                break;
            }
            _ => opt_reply(&mut c, opt, 0x8000_0001, &[]).ok()?,
        }
    }
    loop {
        let mut h = [0u8; 32];
        c.read_exact(&mut h).ok()?;
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let typ = u16::from_be_bytes([h[6], h[7]]);
        let cookie = be64(&h[8..]);
        let off = be64(&h[16..]);
        let mut len = be64(&h[24..]);
        let mut asked = ids.clone();
        if flags & (1 << 5) != 0 {
            let mut p = vec![0u8; len as usize];
            c.read_exact(&mut p).ok()?;
            if typ == 7 {
                len = be64(&p);
                asked = p[8..].chunks(4).map(be32).collect();
            }
        }
        if typ == 2 {
            return None;
        }
        let answer: Vec<u32> = if hostile && asked.len() < ids.len() {
            ids.iter().copied().filter(|i| !asked.contains(i)).collect()
        } else {
            asked
        };
        let mut out = Vec::new();
        for (i, id) in answer.iter().enumerate() {
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(&1u32.to_be_bytes());
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&u64::from(*id).to_be_bytes());
            let done = u16::from(i + 1 == answer.len());
            out.extend_from_slice(&0x6e8a_278cu32.to_be_bytes());
            out.extend_from_slice(&done.to_be_bytes());
            out.extend_from_slice(&6u16.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&off.to_be_bytes());
            out.extend_from_slice(&(p.len() as u64).to_be_bytes());
            out.extend_from_slice(&p);
        }
        c.write_all(&out).ok()?;
    }
}

#[test]
fn nbdinfo_maps_refuse_a_reply_for_a_context_not_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    fake_server(&good, false);
    fake_server(&bad, true);
    let args = |sock: &Path| {
        vec![
            "--map".to_string(),
            "--map=fake:two".to_string(),
            format!("nbd+unix:///?socket={}", sock.display()),
        ]
    };
    // The well-behaved fake: each context answered with its own id as
    // the type.
    let o = run(Command::new(our_bin("nbdinfo")).args(args(&good)));
    assert_eq!(
        ok(&o),
        "context: base:allocation\n         0     1048576    1  hole\n\
         context: fake:two\n         0     1048576    2\n"
    );
    let o = run(Command::new(our_bin("nbdinfo")).args(args(&bad)));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("did not ask for"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
