//! An nginx web server for the tests: Debian's nginx, run in the
//! foreground on a free loopback port with a generated configuration in a
//! temporary directory, serving that directory's `www/` (real `Range`
//! and keep-alive behaviour). Killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian installs nginx.
pub const NGINX: &str = "/usr/sbin/nginx";

/// A running nginx.
pub struct Nginx {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Start nginx serving an empty `www/` directory (see [`Nginx::root`]).
    pub fn start() -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("www")).unwrap();
        for attempt in 0.. {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let conf = format!(
                r#"
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {d}/www;
        location /private/ {{
            auth_basic "test";
            auth_basic_user_file {d}/htpasswd;
        }}
        location = /moved.img {{ return 302 /disk.img; }}
        location = /loop.img {{ return 302 /loop.img; }}
    }}
}}
"#,
                d = d.display()
            );
            std::fs::write(d.join("nginx.conf"), conf).unwrap();
            let mut child = Command::new(NGINX)
                .arg("-p")
                .arg(d)
                .arg("-e")
                .arg(d.join("error.log"))
                .arg("-c")
                .arg(d.join("nginx.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {NGINX}: {e}"));
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Nginx { child, port, dir };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(d.join("error.log")).unwrap_or_default();
            assert!(attempt < 5, "nginx did not start:\n{log}");
        }
        unreachable!()
    }

    /// The directory served.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    /// The URL of a file under the root.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// Put a file to serve (a copy of `src`) under `name`.
    pub fn serve(&self, src: &Path, name: &str) {
        let dst = self.root().join(name);
        if let Some(p) = dst.parent() {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::copy(src, dst).unwrap();
    }

    /// Write the basic-auth password file for `/private/` (nginx accepts
    /// `{PLAIN}` passwords).
    pub fn set_password(&self, user: &str, password: &str) {
        std::fs::write(
            self.dir.path().join("htpasswd"),
            format!("{user}:{{PLAIN}}{password}\n"),
        )
        .unwrap();
    }

    /// The access log so far.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
