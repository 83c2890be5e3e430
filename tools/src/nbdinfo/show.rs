//! The report on one or more exports (`nbdinfo URI`, `nbdinfo --list`),
//! as text or JSON, field for field like libnbd 1.14's nbdinfo.
//!
//! Information is gathered the way libnbd's nbdinfo gathers it, so a
//! server sees the same requests: `NBD_OPT_INFO` for the export (or
//! `NBD_OPT_GO` if the server does not know INFO),
//! `NBD_OPT_LIST_META_CONTEXT` for its contexts, and, to probe the
//! content, `NBD_OPT_GO` and a read of the first 8K.

use std::io::{self, Write};

use libnbd::client::{BlockSizes, Connection, Error, ExportInfo, Negotiation};

use super::content;
use super::fmt::{ansi, human_size, json_string};

/// Everything printed about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// The export's name (the server's canonical name if it sent one).
    pub name: String,
    /// Its description, if any.
    pub description: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// What the first sectors contain (`--content`).
    pub content: Option<String>,
    /// A URI to connect to it (not for captive servers).
    pub uri: Option<String>,
    /// Its meta contexts, when the server could list them.
    pub contexts: Option<Vec<String>>,
    /// Export flags and capabilities.
    pub info: ExportInfo,
}

/// The connection-wide facts of the report's header.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// `newstyle-fixed`, `newstyle` or `oldstyle`.
    pub protocol: &'static str,
    /// TLS in use.
    pub tls: bool,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Extended headers negotiated.
    pub extended: bool,
}

impl Header {
    /// The header of a connection in negotiation.
    pub fn of(n: &Negotiation) -> Header {
        Header {
            protocol: n.protocol(),
            tls: n.tls(),
            structured: n.structured_replies(),
            extended: n.extended_headers(),
        }
    }
}

/// Output settings.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    /// `--json`.
    pub json: bool,
    /// ANSI colours in the text report.
    pub color: bool,
}

fn colour(w: &mut dyn Write, style: Style, code: &str) -> io::Result<()> {
    if style.color && !style.json {
        w.write_all(code.as_bytes())?;
    }
    Ok(())
}

/// The protocol line (text) or the opening of the JSON object.
pub fn write_header(w: &mut dyn Write, style: Style, h: Header) -> io::Result<()> {
    if style.json {
        write!(
            w,
            "{{\n\"protocol\": {},\n\"TLS\": {},\n\"structured\": {},\n\"extended\": {},\n",
            json_string(h.protocol),
            h.tls,
            h.structured,
            h.extended
        )
    } else {
        colour(w, style, ansi::GREY)?;
        writeln!(
            w,
            "protocol: {} {} TLS, using {} packets",
            h.protocol,
            if h.tls { "with" } else { "without" },
            // As libnbd 1.18+ words it.
            if h.extended {
                "extended"
            } else if h.structured {
                "structured"
            } else {
                "simple"
            }
        )?;
        colour(w, style, ansi::RESTORE)
    }
}

/// The end of the JSON object (nothing in text).
pub fn write_footer(w: &mut dyn Write, style: Style, exports: usize) -> io::Result<()> {
    if style.json {
        if exports == 0 {
            writeln!(w, "\"exports\": []")?;
        }
        writeln!(w, "}}")?;
    }
    Ok(())
}

/// What libnbd's nbdinfo prints to stdout when it cannot open the
/// export after the header: the end of the JSON object.
pub fn write_footer_after_error(w: &mut dyn Write, style: Style) -> io::Result<()> {
    if style.json {
        writeln!(w, "}}")?;
    }
    Ok(())
}

/// The flags shown for every export, in nbdinfo's order.
fn flags(i: &ExportInfo) -> [(&'static str, bool); 10] {
    [
        ("is_rotational", i.is_rotational()),
        ("is_read_only", i.is_read_only()),
        ("can_cache", i.can_cache()),
        ("can_df", i.can_df()),
        ("can_fast_zero", i.can_fast_zero()),
        ("can_flush", i.can_flush()),
        ("can_fua", i.can_fua()),
        ("can_multi_conn", i.can_multi_conn()),
        ("can_trim", i.can_trim()),
        ("can_zero", i.can_zero()),
    ]
}

fn block_sizes(b: Option<BlockSizes>) -> Vec<(&'static str, u32)> {
    b.map(|b| {
        [
            ("block_size_minimum", b.minimum),
            ("block_size_preferred", b.preferred),
            ("block_size_maximum", b.maximum),
        ]
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .collect()
    })
    .unwrap_or_default()
}

/// One export: `index` of `count` (JSON needs to know the first and
/// the last).
pub fn write_export(
    w: &mut dyn Write,
    style: Style,
    e: &ExportReport,
    index: usize,
    count: usize,
) -> io::Result<()> {
    let (size_str, human) = human_size(e.size);
    let description = e.description.as_deref().filter(|d| !d.is_empty());
    if style.json {
        if index == 0 {
            writeln!(w, "\"exports\": [")?;
        }
        writeln!(w, "\t{{")?;
        writeln!(w, "\t\"export-name\": {},", json_string(&e.name))?;
        if let Some(d) = description {
            writeln!(w, "\t\"description\": {},", json_string(d))?;
        }
        if let Some(c) = &e.content {
            writeln!(w, "\t\"content\": {},", json_string(c))?;
        }
        if let Some(u) = &e.uri {
            writeln!(w, "\t\"uri\": {},", json_string(u))?;
        }
        if let Some(ctx) = &e.contexts {
            writeln!(w, "\t\"contexts\": [")?;
            for (i, c) in ctx.iter().enumerate() {
                let comma = if i + 1 < ctx.len() { "," } else { "" };
                writeln!(w, "\t\t{}{comma}", json_string(c))?;
            }
            writeln!(w, "\t],")?;
        }
        for (name, v) in flags(&e.info) {
            writeln!(w, "\t\"{name}\": {v},")?;
        }
        for (name, v) in block_sizes(e.info.block_size) {
            writeln!(w, "\t\"{name}\": {v},")?;
        }
        writeln!(w, "\t\"export-size\": {},", e.size)?;
        writeln!(w, "\t\"export-size-str\": {}", json_string(&size_str))?;
        if index + 1 >= count {
            writeln!(w, "\t}} ]")?;
        } else {
            writeln!(w, "\t}},")?;
        }
        return Ok(());
    }

    colour(w, style, ansi::BOLD_BLACK)?;
    writeln!(w, "export={}:", json_string(&e.name))?;
    if let Some(d) = description {
        writeln!(w, "\tdescription: {d}")?;
    }
    if human {
        writeln!(w, "\texport-size: {} ({size_str})", e.size)?;
    } else {
        writeln!(w, "\texport-size: {}", e.size)?;
    }
    if let Some(c) = &e.content {
        writeln!(w, "\tcontent: {c}")?;
    }
    if let Some(u) = &e.uri {
        writeln!(w, "\turi: {u}")?;
    }
    colour(w, style, ansi::RESTORE)?;
    colour(w, style, ansi::GREY)?;
    if let Some(ctx) = &e.contexts {
        writeln!(w, "\tcontexts:")?;
        for c in ctx {
            writeln!(w, "\t\t{c}")?;
        }
    }
    let flags = flags(&e.info);
    let (name, v) = flags[0];
    writeln!(w, "\t{name}: {v}")?;
    colour(w, style, ansi::RESTORE)?;
    let (name, v) = flags[1];
    writeln!(w, "\t{name}: {v}")?;
    for (name, v) in &flags[2..] {
        colour(w, style, if *v { ansi::GREEN } else { ansi::RED })?;
        writeln!(w, "\t{name}: {v}")?;
        colour(w, style, ansi::RESTORE)?;
    }
    for (name, v) in block_sizes(e.info.block_size) {
        writeln!(w, "\t{name}: {v}")?;
    }
    Ok(())
}

/// Is this error a refusal (the negotiation can go on)?
fn refused(e: &Error) -> bool {
    matches!(e, Error::OptionRefused { .. } | Error::Unsupported(_))
}

/// Gather the report on export `name` over a connection in
/// negotiation. `listed` is the description from `NBD_OPT_LIST` when
/// listing (then the one from `NBD_OPT_INFO` is not used). With
/// `probe`, the export is opened and its first sectors described.
///
/// Returns the report and, if the export was opened, the connection
/// (the negotiation is over then).
pub async fn gather(
    n: &mut Negotiation,
    name: &str,
    listed: Option<&str>,
    probe: bool,
) -> Result<(ExportReport, Option<Connection>), Error> {
    let mut conn = None;
    let info = match n.info(name).await {
        Ok(i) => i,
        Err(e) if refused(&e) => {
            n.set_export_name(name);
            let c = n.go().await?;
            let i = c.info().clone();
            conn = Some(c);
            i
        }
        Err(e) => return Err(e),
    };
    let contexts = if conn.is_none() {
        n.list_meta_contexts(name, &[]).await.ok()
    } else {
        None
    };
    let mut content_str = None;
    if probe {
        if conn.is_none() {
            n.set_export_name(name);
            conn = n.go().await.ok();
        }
        if let Some(c) = &conn {
            let len = c.size().min(content::PROBE_SIZE) as usize;
            content_str = if len == 0 {
                Some(content::describe(&[]))
            } else {
                c.pread_vec(len, 0, 0)
                    .await
                    .ok()
                    .map(|d| content::describe(&d))
            };
        }
    }
    let description = match listed {
        Some(d) => Some(d.to_string()),
        None => info.description.clone(),
    };
    let report = ExportReport {
        name: info.name().to_string(),
        description,
        size: info.size,
        content: content_str,
        uri: n.uri_for(name),
        contexts,
        info,
    };
    Ok((report, conn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::client::TransmissionFlags;
    use libnbd::protocol::tflags;

    fn report() -> ExportReport {
        ExportReport {
            name: "a b".into(),
            description: Some("d".into()),
            size: 1 << 20,
            content: Some("data".into()),
            uri: Some("nbd+unix:///a%20b?socket=/s".into()),
            contexts: Some(vec!["base:allocation".into()]),
            info: ExportInfo {
                export_name: "a b".into(),
                canonical_name: None,
                description: Some("d".into()),
                size: 1 << 20,
                flags: TransmissionFlags(
                    tflags::HAS_FLAGS | tflags::READ_ONLY | tflags::SEND_FLUSH | tflags::SEND_DF,
                ),
                block_size: Some(BlockSizes {
                    minimum: 512,
                    preferred: 4096,
                    maximum: 1 << 25,
                }),
                meta_contexts: Vec::new(),
                structured_replies: true,
                extended_headers: false,
            },
        }
    }

    fn out(f: impl Fn(&mut Vec<u8>) -> io::Result<()>) -> String {
        let mut v = Vec::new();
        f(&mut v).unwrap();
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn text() {
        let style = Style {
            json: false,
            color: false,
        };
        let s = out(|w| write_export(w, style, &report(), 0, 1));
        assert_eq!(
            s,
            "export=\"a b\":\n\tdescription: d\n\texport-size: 1048576 (1M)\n\tcontent: data\n\
             \turi: nbd+unix:///a%20b?socket=/s\n\tcontexts:\n\t\tbase:allocation\n\
             \tis_rotational: false\n\tis_read_only: true\n\tcan_cache: false\n\tcan_df: true\n\
             \tcan_fast_zero: false\n\tcan_flush: true\n\tcan_fua: false\n\tcan_multi_conn: false\n\
             \tcan_trim: false\n\tcan_zero: false\n\tblock_size_minimum: 512\n\
             \tblock_size_preferred: 4096\n\tblock_size_maximum: 33554432\n"
        );
        let h = Header {
            protocol: "newstyle-fixed",
            tls: false,
            structured: true,
            extended: false,
        };
        assert_eq!(
            out(|w| write_header(w, style, h)),
            "protocol: newstyle-fixed without TLS, using structured packets\n"
        );
        let h = Header {
            extended: true,
            ..h
        };
        assert_eq!(
            out(|w| write_header(w, style, h)),
            "protocol: newstyle-fixed without TLS, using extended packets\n"
        );
    }

    #[test]
    fn json_is_valid() {
        let style = Style {
            json: true,
            color: false,
        };
        let h = Header {
            protocol: "newstyle-fixed",
            tls: false,
            structured: true,
            extended: true,
        };
        let s = out(|w| {
            write_header(w, style, h)?;
            write_export(w, style, &report(), 0, 2)?;
            write_export(w, style, &report(), 1, 2)?;
            write_footer(w, style, 2)
        });
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["exports"][1]["export-size-str"], "1M");
        assert_eq!(v["extended"], true);
        assert_eq!(v["exports"][0]["block_size_minimum"], 512);
        let empty = out(|w| {
            write_header(w, style, h)?;
            write_footer(w, style, 0)
        });
        let v: serde_json::Value = serde_json::from_str(&empty).unwrap();
        assert_eq!(v["exports"].as_array().unwrap().len(), 0);
    }
}
