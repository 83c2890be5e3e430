//! The luks filter end to end, on LUKSv1 volumes `cryptsetup luksFormat
//! --type luks1` made: data written by qemu-io (qemu's own LUKS driver)
//! read through our filter, data written through our filter read by
//! qemu-img and by upstream's luks filter (XTS only: upstream 1.32 crashes
//! on CBC volumes), wrong passphrases refused, and a volume inside a
//! partition served with the partition filter below ours.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{nbdpy, require, require_nbdsh, run, run_ok, Server};
use crate::filter_offset::copy_out;

const PASS: &str = "correct horse";

/// An 8 MiB LUKSv1 volume of this cipher, key size and hash.
fn luks_volume(dir: &Path, name: &str, cipher: &str, bits: &str, hash: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let key = dir.join("key");
    std::fs::write(&key, PASS).unwrap();
    run_ok(Command::new("cryptsetup").args([
        "luksFormat",
        "--type",
        "luks1",
        "--batch-mode",
        "--pbkdf-force-iterations",
        "1000",
        "-c",
        cipher,
        "-s",
        bits,
        "-h",
        hash,
        "--key-file",
        key.to_str().unwrap(),
        path.to_str().unwrap(),
    ]));
    path
}

fn qemu_opts(vol: &Path) -> String {
    format!(
        "driver=luks,key-secret=sec0,file.filename={}",
        vol.display()
    )
}

/// qemu's view of the decrypted volume.
fn qemu_plain(vol: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "--object"])
            .arg(format!("secret,id=sec0,data={PASS}"))
            .arg("--image-opts")
            .arg(qemu_opts(vol))
            .args(["-O", "raw"])
            .arg(&out),
    );
    std::fs::read(out).unwrap()
}

fn qemu_write(vol: &Path, cmd: &str) {
    run_ok(
        Command::new("qemu-io")
            .arg("--object")
            .arg(format!("secret,id=sec0,data={PASS}"))
            .arg("--image-opts")
            .arg(qemu_opts(vol))
            .args(["-c", cmd]),
    );
}

const WRITE: &str = r#"
print(h.get_size(), h.get_block_size(0))
h.set_strict_mode(0)
h.pwrite(b"written by our luks filter" * 400, 1 << 20)
h.pwrite(b"unaligned!", 100003)
h.zero(4096, 2 << 20)
h.flush()
"#;

#[test]
fn luks_volumes_of_cryptsetup_read_and_write_as_qemu_and_upstream() {
    if !require(&["cryptsetup", "qemu-img", "qemu-io", "nbdcopy"]) || !require_nbdsh() {
        return;
    }
    let upstream = require(&["nbdkit"]);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let pw = dir.join("pw");
    std::fs::write(&pw, format!("{PASS}\n")).unwrap();
    let pass_file = format!("passphrase=+{}", pw.display());
    for (cipher, bits, hash, theirs) in [
        ("aes-xts-plain64", "512", "sha256", true),
        ("aes-xts-plain", "256", "sha1", true),
        ("aes-cbc-essiv:sha256", "256", "sha1", false),
        ("aes-cbc-plain64", "128", "ripemd160", false),
    ] {
        let vol = luks_volume(dir, "vol.img", cipher, bits, hash);
        qemu_write(&vol, "write -P 0x5a 4096 65536");
        let args = ["file", vol.to_str().unwrap(), "--filter=luks", &pass_file];
        // qemu's writes read back through ours.
        let s = Server::ours(&args);
        let before = copy_out(&s.uri(), dir);
        assert_eq!(before, qemu_plain(&vol, dir), "{cipher}");
        assert_eq!(&before[4096..4096 + 65536], &[0x5a; 65536][..], "{cipher}");
        // Ours writes, qemu reads.
        let out = nbdpy(&s.uri(), WRITE);
        assert!(
            out.starts_with("6291456 512\n") || out.starts_with("7340032 512\n"),
            "{cipher}: {out}"
        );
        drop(s);
        let after = qemu_plain(&vol, dir);
        let mut want = before.clone();
        let msg = b"written by our luks filter".repeat(400);
        want[1 << 20..(1 << 20) + msg.len()].copy_from_slice(&msg);
        want[100003..100013].copy_from_slice(b"unaligned!");
        want[2 << 20..(2 << 20) + 4096].fill(0);
        assert!(after == want, "{cipher}: qemu does not read what we wrote");
        if theirs && upstream {
            let secret = format!("passphrase={PASS}");
            let up = ["file", vol.to_str().unwrap(), "--filter=luks", &secret];
            assert!(
                copy_out(&Server::upstream(&up).uri(), dir) == want,
                "{cipher}: upstream differs"
            );
            // Upstream writes, ours reads.
            nbdpy(&Server::upstream(&up).uri(), "h.pwrite(b'U' * 512, 8192)");
            want[8192..8704].fill(b'U');
            let ours = ["file", vol.to_str().unwrap(), "--filter=luks", &secret];
            assert!(
                copy_out(&Server::ours(&ours).uri(), dir) == want,
                "{cipher}: ours differs"
            );
        }
    }
}

#[test]
fn luks_wrong_passphrase_and_not_luks_fail_the_connection() {
    if !require(&["cryptsetup", "nbdinfo"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let vol = luks_volume(dir, "vol.img", "aes-xts-plain64", "256", "sha256");
    let plain = dir.join("plain.img");
    std::fs::write(&plain, vec![0u8; 1 << 20]).unwrap();
    for (file, pass) in [(&vol, "passphrase=wrong"), (&plain, "passphrase=x")] {
        let mut s = Server::ours(&["file", file.to_str().unwrap(), "--filter=luks", pass]);
        let out = run(Command::new("nbdinfo").arg(s.uri()));
        assert!(!out.status.success());
        assert!(s.alive());
    }
    // No passphrase: a configuration error.
    let out = run(Command::new(crate::common::nbdkit()).args([
        "-U",
        "-",
        "file",
        vol.to_str().unwrap(),
        "--filter=luks",
        "--run",
        "true",
    ]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("passphrase"));
}

#[test]
fn luks_inside_a_partition_with_the_partition_filter() {
    if !require(&["cryptsetup", "qemu-img", "qemu-io", "nbdcopy"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let vol = luks_volume(dir, "vol.img", "aes-xts-plain64", "512", "sha256");
    qemu_write(&vol, "write -P 0x33 0 1M");
    let want = qemu_plain(&vol, dir);
    // A disk with one MBR partition from sector 2048 holding the volume.
    let mut disk = vec![0u8; 1 << 20];
    let sectors = (std::fs::metadata(&vol).unwrap().len() / 512) as u32;
    let e = 446;
    disk[e + 4] = 0x83;
    disk[e + 8..e + 12].copy_from_slice(&2048u32.to_le_bytes());
    disk[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
    disk[510] = 0x55;
    disk[511] = 0xaa;
    disk.extend(std::fs::read(&vol).unwrap());
    let disk_path = dir.join("disk.img");
    std::fs::write(&disk_path, &disk).unwrap();
    let secret = format!("passphrase={PASS}");
    let args = [
        "file",
        disk_path.to_str().unwrap(),
        "--filter=luks",
        &secret,
        "--filter=partition",
        "partition=1",
    ];
    let ours = copy_out(&Server::ours(&args).uri(), dir);
    assert!(ours == want, "ours differs from qemu");
    if require(&["nbdkit"]) {
        assert!(
            copy_out(&Server::upstream(&args).uri(), dir) == ours,
            "upstream differs"
        );
    }
}

#[test]
fn luks_volume_made_by_qemu_img() {
    if !require(&["qemu-img", "qemu-io", "nbdcopy"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let vol = dir.join("q.img");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "luks", "--object"])
            .arg(format!("secret,id=sec0,data={PASS}"))
            .args(["-o", "key-secret=sec0,iter-time=10"])
            .arg(&vol)
            .arg("4M"),
    );
    qemu_write(&vol, "write -P 0x77 512 8192");
    let want = qemu_plain(&vol, dir);
    let secret = format!("passphrase={PASS}");
    let args = [
        "-r",
        "file",
        vol.to_str().unwrap(),
        "--filter=luks",
        &secret,
    ];
    let ours = copy_out(&Server::ours(&args).uri(), dir);
    assert!(ours == want, "ours differs from qemu");
    if require(&["nbdkit"]) {
        assert!(
            copy_out(&Server::upstream(&args).uri(), dir) == ours,
            "upstream differs"
        );
    }
}
