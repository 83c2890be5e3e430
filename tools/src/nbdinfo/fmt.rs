//! Small formatting helpers that reproduce libnbd's nbdinfo output
//! byte for byte: JSON strings, human-readable sizes, C's `%g`, and the
//! ANSI colours of the text report.

/// A JSON string literal: `"` and `\` escaped, control characters as
/// `\u00XX`, everything else (including non-ASCII) as is.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A size with the largest binary unit that divides it exactly:
/// `1048576` is `1M`, `2125119488` is `2075312K`, `6` is `6`. The flag
/// says whether a unit was added.
pub fn human_size(bytes: u64) -> (String, bool) {
    const UNITS: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];
    let mut n = bytes;
    let mut i = 0;
    if n != 0 {
        while n.is_multiple_of(1024) && i < UNITS.len() - 1 {
            n /= 1024;
            i += 1;
        }
    }
    (format!("{n}{}", UNITS[i]), i > 0)
}

/// C's `printf("%g", v)`: 6 significant digits, trailing zeros removed,
/// exponent form below 1e-4 and from 1e6.
pub fn fmt_g(v: f64) -> String {
    const P: i32 = 6;
    if v == 0.0 {
        return "0".into();
    }
    if !v.is_finite() {
        return if v.is_nan() {
            "nan".into()
        } else if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    // The exponent after rounding to P significant digits.
    let e_form = format!("{:.*e}", (P - 1) as usize, v);
    let (mantissa, exp) = e_form.split_once('e').unwrap_or((&e_form, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..P).contains(&exp) {
        let m = strip_zeros(mantissa);
        format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    } else {
        let decimals = (P - 1 - exp).max(0) as usize;
        strip_zeros(&format!("{v:.decimals$}")).to_string()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// ANSI colours of nbdinfo's text report.
pub mod ansi {
    /// Reset.
    pub const RESTORE: &str = "\x1b[0m";
    /// Grey (dim text: the protocol line, contexts).
    pub const GREY: &str = "\x1b[22;90m";
    /// Bold black (the export heading).
    pub const BOLD_BLACK: &str = "\x1b[1;30m";
    /// Green (true flags).
    pub const GREEN: &str = "\x1b[22;32m";
    /// Red (false flags).
    pub const RED: &str = "\x1b[22;31m";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json() {
        assert_eq!(json_string("a b"), "\"a b\"");
        assert_eq!(
            json_string("hello \"world\"\ttab\\"),
            "\"hello \\\"world\\\"\\u0009tab\\\\\""
        );
        assert_eq!(json_string("\u{e9}\u{1f}"), "\"\u{e9}\\u001f\"");
    }

    #[test]
    fn human() {
        assert_eq!(human_size(0), ("0".into(), false));
        assert_eq!(human_size(6), ("6".into(), false));
        assert_eq!(human_size(1024), ("1K".into(), true));
        assert_eq!(human_size(1 << 20), ("1M".into(), true));
        assert_eq!(human_size(1 << 30), ("1G".into(), true));
        assert_eq!(human_size(2125119488), ("2075312K".into(), true));
        assert_eq!(human_size(1 << 62), ("4E".into(), true));
        assert_eq!(human_size(i64::MAX as u64), (i64::MAX.to_string(), false));
    }

    #[test]
    fn g() {
        let cases = [
            (100.0, "100"),
            (99.21875, "99.2188"),
            (0.78125, "0.78125"),
            (97.265625, "97.2656"),
            (1.953125, "1.95312"),
            (0.390625, "0.390625"),
            (50.0, "50"),
            (33.333333333, "33.3333"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (9.094947017729282e-11, "9.09495e-11"),
            (1234567.0, "1.23457e+06"),
            (999999.5, "1e+06"),
            (12.5, "12.5"),
        ];
        for (v, s) in cases {
            assert_eq!(fmt_g(v), s, "{v}");
        }
    }
}
