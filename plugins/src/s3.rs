//! # S3: a disk in an Amazon S3 bucket or any S3-compatible object store
//!
//! Serves one object read-only, or a read-write disk stored as one
//! object per chunk, on AWS S3, Ceph's RADOS gateway, MinIO, Garage or
//! any other store that speaks the S3 protocol. Requests are signed,
//! retried with backoff on server errors and throttling, and run in
//! parallel (upstream's Python plugin runs one at a time). The plugin is
//! also found as `s3`.
//!
//! ```text
//! nbdkit S3 endpoint-url=https://ceph.example.com bucket=images key=disk.img
//! nbdkit S3 bucket=images key=disk size=50G object-size=8M
//! nbdkit S3 bucket=images key=disk size=50G object-size=8M profile=backup \
//!     --run 'nbdcopy disk.raw $uri'
//! ```
//!
//! ## Parameters
//!
//! - `bucket=BUCKET` (required): the bucket.
//! - `key=STRING` (required): the object (single-object mode), or the
//!   prefix of the chunk objects (chunked mode, when `size` is given).
//! - `size=SIZE`, `object-size=SIZE`: together, a read-write disk of
//!   `size` bytes stored as objects of `object-size` bytes named
//!   `KEY/%016x` (the chunk number in hex), as upstream names them, so
//!   either plugin opens the other's disks. `size` must be a multiple of
//!   `object-size`. A chunk that has no object reads as zeroes; trimming
//!   or zeroing a whole chunk deletes its object. Object sizes from 4K up
//!   to 64M are taken (upstream: requests of exactly the object size are
//!   the only fast ones; here any request is, see Behaviour).
//! - `endpoint-url=URL`: the store's address, for anything but AWS
//!   (`http://` or `https://`); requests then use path-style addressing.
//! - `access-key=ID`, `secret-key=SECRET`, `session-token=TOKEN`: the
//!   credentials (visible to other users in `ps`: prefer the environment
//!   or the credentials file).
//! - `profile=NAME`: the profile of `~/.aws/credentials` and
//!   `~/.aws/config` to use (default `$AWS_PROFILE`, else `default`).
//! - `region=REGION`: the region (default `$AWS_REGION`,
//!   `$AWS_DEFAULT_REGION`, the profile's `region`, else `us-east-1`).
//! - `cache-max=SIZE` (default 256M, at least 2 objects): the most data the
//!   write-back cache of a chunked disk holds.
//!
//! Credentials are taken from the parameters, else from
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, else
//! from the profile in `~/.aws/credentials` (`aws_access_key_id`,
//! `aws_secret_access_key`, `aws_session_token`; `$AWS_SHARED_CREDENTIALS_FILE`
//! and `$AWS_CONFIG_FILE` move the files). Without any, the plugin refuses
//! to start rather than wait for an instance metadata service.
//!
//! ## Behaviour
//!
//! The layout, the write-back cache, flushing and extents are the shared
//! ones of [`crate::objstore`] (which the `azure` plugin uses too).
//! Requests that fail with server errors or throttling are retried (up to
//! 10 times, with exponential backoff, for at most 3 minutes).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use libnbd::{ConfigError, ConfigResult, Params, Plugin, PluginEntry};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::RetryConfig;

use crate::objstore;

/// The registry entry of the S3 plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "S3",
    help: "\
bucket=BUCKET           The bucket (required).
key=STRING              The object, or the prefix of the chunk objects (required).
size=SIZE               The size of a chunked read-write disk (with object-size).
object-size=SIZE        The size of each chunk object (with size).
endpoint-url=URL        The S3-compatible store (default AWS).
access-key=ID           The access key id.
secret-key=SECRET       The secret access key.
session-token=TOKEN     The session token.
profile=NAME            The profile of ~/.aws/credentials and ~/.aws/config.
region=REGION           The region.
cache-max=SIZE          The largest write-back cache (default 256M).",
    magic: None,
    create,
};

/// Build the plugin from its parameters.
pub fn create(p: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let bucket = p
        .take("bucket")
        .ok_or_else(|| ConfigError::new("S3: the bucket parameter is required"))?;
    let disk = objstore::take_disk(p, "S3")?;
    let creds = Credentials {
        access_key: p.take("access-key"),
        secret_key: p.take("secret-key"),
        session_token: p.take("session-token"),
        profile: p.take("profile"),
        region: p.take("region"),
        endpoint: p.take("endpoint-url"),
    };
    let store = creds.build(&bucket)?;
    Ok(objstore::plugin("S3", Arc::new(store), bucket, disk))
}

/// Where the credentials, region and endpoint come from.
struct Credentials {
    access_key: Option<String>,
    secret_key: Option<String>,
    session_token: Option<String>,
    profile: Option<String>,
    region: Option<String>,
    endpoint: Option<String>,
}

impl Credentials {
    /// The store, with credentials from the parameters, the environment or
    /// the AWS files, in that order.
    fn build(self, bucket: &str) -> ConfigResult<AmazonS3> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let profile = self
            .profile
            .clone()
            .or_else(|| env("AWS_PROFILE"))
            .unwrap_or_else(|| "default".into());
        let home = env("HOME").map(PathBuf::from);
        let creds_file = env("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws/credentials")));
        let config_file = env("AWS_CONFIG_FILE")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws/config")));
        let from_creds = creds_file
            .map(|f| ini_section(&f, &profile))
            .transpose()?
            .flatten()
            .unwrap_or_default();
        // ~/.aws/config names a profile's section "profile NAME", but the
        // default one "default".
        let config_section = if profile == "default" {
            profile.clone()
        } else {
            format!("profile {profile}")
        };
        let from_config = config_file
            .map(|f| ini_section(&f, &config_section))
            .transpose()?
            .flatten()
            .unwrap_or_default();

        let (access, secret, token) = match (self.access_key, self.secret_key) {
            (Some(a), Some(s)) => (a, s, self.session_token),
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::new(
                    "S3: access-key and secret-key must be given together",
                ))
            }
            (None, None) => match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
                (Some(a), Some(s)) => (a, s, env("AWS_SESSION_TOKEN")),
                _ => match (
                    from_creds.get("aws_access_key_id"),
                    from_creds.get("aws_secret_access_key"),
                ) {
                    (Some(a), Some(s)) => (
                        a.clone(),
                        s.clone(),
                        from_creds.get("aws_session_token").cloned(),
                    ),
                    _ => {
                        return Err(ConfigError::new(format!(
                            "S3: no credentials: give access-key= and secret-key=, set \
                             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add them to \
                             profile '{profile}' of ~/.aws/credentials"
                        )))
                    }
                },
            },
        };
        let region = self
            .region
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or_else(|| from_config.get("region").cloned())
            .unwrap_or_else(|| "us-east-1".into());
        let endpoint = self
            .endpoint
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| from_config.get("endpoint_url").cloned());

        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(region)
            .with_access_key_id(access)
            .with_secret_access_key(secret)
            .with_retry(RetryConfig::default());
        if let Some(t) = token {
            b = b.with_token(t);
        }
        if let Some(e) = endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ConfigError::new(format!(
                    "S3: endpoint-url must start with http:// or https://, not '{e}'"
                )));
            }
            b = b
                .with_allow_http(e.starts_with("http://"))
                .with_endpoint(e)
                .with_virtual_hosted_style_request(false);
        }
        b.build()
            .map_err(|e| ConfigError::new(format!("S3: cannot configure the store: {e}")))
    }
}

/// The `key = value` lines of section `[name]` of an AWS INI file, or
/// `None` if the file does not exist.
fn ini_section(
    file: &std::path::Path,
    name: &str,
) -> ConfigResult<Option<HashMap<String, String>>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ConfigError::new(format!(
                "S3: cannot read {}: {e}",
                file.display()
            )))
        }
    };
    Ok(Some(parse_ini_section(&text, name)))
}

/// The `key = value` lines of section `[name]` of INI text.
fn parse_ini_section(text: &str, name: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = section.trim() == name;
            continue;
        }
        if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters() {
        let bad = |w: &[&str]| {
            let mut p = Params::parse(w, None).unwrap();
            ENTRY.configure(&mut p).err().map(|e| e.0)
        };
        let creds = [
            "access-key=a",
            "secret-key=b",
            "endpoint-url=http://127.0.0.1:1",
        ];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = creds.to_vec();
            v.extend_from_slice(extra);
            bad(&v)
        };
        assert!(with(&["key=k"]).unwrap().contains("bucket"));
        assert!(with(&["bucket=b"]).unwrap().contains("key"));
        assert!(with(&["bucket=b", "key=k", "size=1M"])
            .unwrap()
            .contains("together"));
        assert!(with(&["bucket=b", "key=k", "size=1M", "object-size=300k"])
            .unwrap()
            .contains("multiple"));
        assert!(
            with(&["bucket=b", "key=k", "size=128M", "object-size=128M"])
                .unwrap()
                .contains("between")
        );
        assert!(bad(&["bucket=b", "key=k", "access-key=a"])
            .unwrap()
            .contains("together"));
        assert!(with(&["bucket=b", "key=k", "endpoint-url=ftp://x"]).is_some());
        assert!(with(&["bucket=b", "key=k", "size=1M", "object-size=64k"]).is_none());
        assert!(with(&["bucket=b", "key=k"]).is_none());
    }

    #[test]
    fn ini_sections() {
        let text = "\
# comment
[default]
aws_access_key_id = A1
aws_secret_access_key=S1

[profile other]
region = eu-west-1
[other]
aws_access_key_id = A2
";
        let d = parse_ini_section(text, "default");
        assert_eq!(d.get("aws_access_key_id").map(String::as_str), Some("A1"));
        assert_eq!(
            d.get("aws_secret_access_key").map(String::as_str),
            Some("S1")
        );
        assert_eq!(d.len(), 2);
        let p = parse_ini_section(text, "profile other");
        assert_eq!(p.get("region").map(String::as_str), Some("eu-west-1"));
        let o = parse_ini_section(text, "other");
        assert_eq!(o.get("aws_access_key_id").map(String::as_str), Some("A2"));
        assert!(parse_ini_section(text, "none").is_empty());
    }
}
