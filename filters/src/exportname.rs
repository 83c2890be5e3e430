//! # exportname: change the export list, the default export and descriptions
//!
//! Plugins that serve several exports (the file plugin's `dir=`) list
//! them for `NBD_OPT_LIST` and pick one when a client asks for the
//! default export (the empty name). This filter changes what clients are
//! told: which name the default export stands for, which exports are
//! listed, which names a client may open, and the descriptions sent with
//! them.
//!
//! ```text
//! nbdkit --filter=exportname file dir=/path/to/dir default-export=file2
//! nbdkit --filter=exportname file dir=/path/to/dir exportname-list=empty
//! nbdkit --filter=exportname file dir=/path/to/dir \
//!   exportname-list=explicit exportname-strict=true exportname=file1 exportname=file3
//! nbdkit --filter=exportname file dir=/path/to/dir exportdesc=script:'ls -l /path/to/dir/"$name"'
//! ```
//!
//! ## Parameters
//!
//! - `default-export=NAME`: a client asking for the default export ("")
//!   gets `NAME` from the layers below instead of their own default; an
//!   empty `NAME` is the same as leaving it out.
//! - `exportname-list=keep` (default): list what the layers below list;
//!   `exportname-list=error`: answer the list request with an error;
//!   `exportname-list=empty`: an empty list;
//!   `exportname-list=defaultonly`: only the default export's name;
//!   `exportname-list=explicit`: only the names given by `exportname=`.
//! - `exportname-strict=true`: a client may open only the names given by
//!   `exportname=` (the default export only if `exportname=` is given
//!   empty); default false, any name goes through.
//! - `exportname=NAME`: a name for `exportname-list=explicit` and
//!   `exportname-strict`; may be given several times.
//! - `exportdesc=keep` (default): descriptions as the layers below give
//!   them; `exportdesc=none`: no descriptions; `exportdesc=fixed:STRING`:
//!   `STRING` for every export; `exportdesc=script:SCRIPT`: the output of
//!   `SCRIPT`, run by `/bin/sh` with `$name` set to the export's name
//!   (without its final newline).
//!
//! ## Behaviour
//!
//! The list need not be the truth: a listed name may be refused and an
//! unlisted one opened, unless `exportname-strict` is set. Descriptions
//! go both into the list and into `NBD_INFO_DESCRIPTION` when a client
//! opens an export; a script's exit status is ignored.

use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    parse_bool, ConfigError, ConfigResult, Error, ExportEntry, Filter, FilterEntry, Handle, Next,
    OpenContext, Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "exportname",
    help: "\
default-export=<NAME>     Canonical name for the \"\" default export.
exportname-list=<MODE>    Which exports to advertise: keep (default), error,
                          empty, defaultonly, explicit.
exportname-strict=<BOOL>  Limit clients to explicit exports (default false).
exportname=<NAME>         Add an explicit export name, may be repeated.
exportdesc=<MODE>         Set descriptions according to mode: keep (default),
                          none, fixed:STRING, script:SCRIPT.",
    create,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListMode {
    Keep,
    Error,
    Empty,
    DefaultOnly,
    Explicit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Desc {
    Keep,
    None,
    Fixed(String),
    Script(String),
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let default = p.take("default-export").filter(|d| !d.is_empty());
    let list = match p.take("exportname-list").as_deref() {
        None | Some("keep") => ListMode::Keep,
        Some("error") => ListMode::Error,
        Some("empty") => ListMode::Empty,
        Some("defaultonly") => ListMode::DefaultOnly,
        Some("explicit") => ListMode::Explicit,
        Some(v) => {
            return Err(ConfigError::new(format!(
                "unrecognized exportname-list mode: {v}"
            )))
        }
    };
    let strict = match p.take("exportname-strict") {
        Some(v) => {
            parse_bool(&v).map_err(|e| ConfigError::new(format!("exportname-strict: {e}")))?
        }
        None => false,
    };
    let names = p.take_all("exportname");
    let desc = match p.take("exportdesc") {
        None => Desc::Keep,
        Some(v) => match v.as_str() {
            "keep" => Desc::Keep,
            "none" => Desc::None,
            _ => {
                if let Some(s) = v.strip_prefix("fixed:") {
                    Desc::Fixed(s.to_string())
                } else if let Some(s) = v.strip_prefix("script:") {
                    Desc::Script(s.to_string())
                } else {
                    return Err(ConfigError::new(format!(
                        "unrecognized exportdesc mode: {v}"
                    )));
                }
            }
        },
    };
    Ok(Arc::new(ExportName {
        default,
        list,
        strict,
        names,
        desc,
    }))
}

struct ExportName {
    default: Option<String>,
    list: ListMode,
    strict: bool,
    names: Vec<String>,
    desc: Desc,
}

impl ExportName {
    /// The description of `name` under the `exportdesc` mode, given the
    /// one the layers below have (`keep`).
    async fn describe(&self, name: &str, below: Option<String>) -> Option<String> {
        match &self.desc {
            Desc::Keep => below,
            Desc::None => None,
            Desc::Fixed(s) => Some(s.clone()),
            Desc::Script(script) => {
                let out = tokio::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg(script)
                    .env("name", name)
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .await;
                match out {
                    Ok(o) => {
                        let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                        if s.ends_with('\n') {
                            s.pop();
                        }
                        Some(s)
                    }
                    Err(e) => {
                        libnbd::elog!("nbdkit: exportname: exportdesc script: /bin/sh: {e}");
                        None
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Filter for ExportName {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        // The check is of the name the client sent: "" is the default
        // export only if listed as such.
        let sent = if ctx.default_export {
            ""
        } else {
            ctx.export_name.as_str()
        };
        if self.strict && !self.names.iter().any(|n| n == sent) {
            let msg = if sent.is_empty() {
                "default export (\"\") not permitted".to_string()
            } else {
                format!("export '{sent}' not found")
            };
            libnbd::elog!("nbdkit: exportname[{}]: error: {msg}", ctx.id);
            return Err(Error::einval(msg));
        }
        let next = next.open(ctx).await?;
        let description = self
            .describe(&ctx.export_name, next.export_description())
            .await;
        Ok(Box::new(ExportNameHandle { next, description }))
    }

    async fn list_exports(&self, next: Next<'_>, readonly: bool) -> Result<Vec<ExportEntry>> {
        let list = match self.list {
            ListMode::Keep => next.list_exports(readonly).await?,
            ListMode::Error => {
                let msg = "export list restricted by policy";
                libnbd::elog!("nbdkit: exportname: error: {msg}");
                return Err(Error::eperm(msg));
            }
            ListMode::Empty => Vec::new(),
            ListMode::DefaultOnly => vec![ExportEntry {
                name: self.default_export(next),
                description: None,
            }],
            ListMode::Explicit => self
                .names
                .iter()
                .map(|n| ExportEntry {
                    name: n.clone(),
                    description: None,
                })
                .collect(),
        };
        let mut out = Vec::with_capacity(list.len());
        for e in list {
            let description = self.describe(&e.name, e.description).await;
            out.push(ExportEntry {
                name: e.name,
                description,
            });
        }
        Ok(out)
    }

    fn default_export(&self, next: Next<'_>) -> String {
        match &self.default {
            Some(d) => d.clone(),
            None => next.default_export(),
        }
    }
}

struct ExportNameHandle {
    next: Box<dyn Handle>,
    /// Worked out at open (a script runs off the reactor there).
    description: Option<String>,
}

#[async_trait]
impl Handle for ExportNameHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn export_description(&self) -> Option<String> {
        self.description.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    fn stack_of(words: &[&str]) -> (libnbd::Stack, Arc<Mem>) {
        let mem = Mem::new(512);
        (stack(vec![create(&mut params(words)).unwrap()], &mem), mem)
    }

    fn names(list: &[ExportEntry]) -> Vec<(&str, Option<&str>)> {
        list.iter()
            .map(|e| (e.name.as_str(), e.description.as_deref()))
            .collect()
    }

    #[tokio::test]
    async fn exportname_list_modes() {
        let (s, _) = stack_of(&[]);
        assert_eq!(
            names(&s.top().list_exports(false).await.unwrap()),
            [("", None)]
        );
        let (s, _) = stack_of(&["exportname-list=error"]);
        assert!(s.top().list_exports(false).await.is_err());
        let (s, _) = stack_of(&["exportname-list=empty"]);
        assert!(s.top().list_exports(false).await.unwrap().is_empty());
        let (s, _) = stack_of(&["exportname-list=defaultonly", "default-export=d"]);
        assert_eq!(
            names(&s.top().list_exports(false).await.unwrap()),
            [("d", None)]
        );
        assert_eq!(s.top().default_export(), "d");
        let (s, _) = stack_of(&[
            "exportname-list=explicit",
            "exportname=a",
            "exportname=b",
            "exportdesc=fixed:hi",
        ]);
        assert_eq!(
            names(&s.top().list_exports(false).await.unwrap()),
            [("a", Some("hi")), ("b", Some("hi"))]
        );
        let (s, _) = stack_of(&["default-export="]);
        assert_eq!(s.top().default_export(), "");
        for bad in [
            "exportname-list=all",
            "exportdesc=foo",
            "exportname-strict=maybe",
        ] {
            assert!(create(&mut params(&[bad])).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn exportname_strict_and_descriptions() {
        let (s, _) = stack_of(&[
            "exportname-strict=true",
            "exportname=a",
            "exportdesc=script:echo \"desc of $name\"",
        ]);
        let asked = |name: &str| OpenContext {
            export_name: name.into(),
            default_export: false,
            ..ctx(1)
        };
        let h = s.open(&asked("a")).await.unwrap();
        assert_eq!(h.export_description().as_deref(), Some("desc of a"));
        let e = s.open(&asked("b")).await.err().unwrap();
        assert!(e.msg.contains("export 'b' not found"), "{}", e.msg);
        // The default export, even when it is "a", must be listed as "".
        let default = OpenContext {
            export_name: "a".into(),
            default_export: true,
            ..ctx(1)
        };
        let e = s.open(&default).await.err().unwrap();
        assert!(e.msg.contains("default export"), "{}", e.msg);
        let (s, _) = stack_of(&["exportname-strict=1", "exportname="]);
        s.open(&ctx(1)).await.unwrap();
        let (s, _) = stack_of(&["exportdesc=none"]);
        assert_eq!(
            names(&s.top().list_exports(false).await.unwrap()),
            [("", None)]
        );
    }
}
