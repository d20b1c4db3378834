//! What Hugging Face's chat-template environment has beside Jinja itself, as
//! transformers defines it, so that a template renders here as `apply_chat_template`
//! renders it: `tojson` (Python's `json.dumps`), values printed as Python prints them
//! (`['a', 'b']`, `{'k': 1}`, `True`, `None`), `strftime_now` and the
//! `{% generation %}` block.
//!
//! Message text reaches a template with special tokens' text escaped by private-use
//! characters of plane 15 (`Tokenizer::escape_content`); Python would print those as
//! `\U000f0000`, which would turn an escape into text, so they are written as they are.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};
use serde_json::Value as Json;

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.into())
}

/// Plane 15's private-use characters: the escapes of special tokens' text.
fn is_escape(c: char) -> bool {
    ('\u{F0000}'..='\u{FFFFF}').contains(&c)
}

/// `tojson(indent=None, ensure_ascii=False, separators=None, sort_keys=False)`:
/// `json.dumps` with transformers' default of `ensure_ascii=False`.
pub fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_usize(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n)),
            (None, Some(s)) => Some(s.to_string()),
            _ => return Err(invalid("tojson: `indent` must be a number or a string")),
        },
    };
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(invalid("tojson: `separators` must be two strings")),
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let dumper = Dumper {
        indent,
        item,
        key,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let json = serde_json::to_value(&value).map_err(|e| invalid(e.to_string()))?;
    let mut out = String::new();
    dumper.dump(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// `json.dumps`' options.
struct Dumper {
    indent: Option<String>,
    item: String,
    key: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl Dumper {
    fn dump(&self, v: &Json, level: usize, out: &mut String) {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => match n.as_f64().filter(|_| n.is_f64()) {
                Some(f) => out.push_str(&python_float(f)),
                None => out.push_str(&n.to_string()),
            },
            Json::String(s) => self.string(s, out),
            Json::Array(items) if items.is_empty() => out.push_str("[]"),
            Json::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separate(i, level + 1, out);
                    self.dump(item, level + 1, out);
                }
                self.close(level, out);
                out.push(']');
            }
            Json::Object(map) if map.is_empty() => out.push_str("{}"),
            Json::Object(map) => {
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    self.separate(i, level + 1, out);
                    self.string(k, out);
                    out.push_str(&self.key);
                    self.dump(v, level + 1, out);
                }
                self.close(level, out);
                out.push('}');
            }
        }
    }

    /// Before the `i`th item of a container whose items are at `level`.
    fn separate(&self, i: usize, level: usize, out: &mut String) {
        if i > 0 {
            out.push_str(&self.item);
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
    }

    /// Before the closing bracket of a non-empty container at `level`.
    fn close(&self, level: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !c.is_ascii() && !is_escape(c) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` writes it: the shortest digits that read back, fixed
/// notation from 1e-4 up to 1e16 (`0.0001`, `1e-05`, `1000000000000000.0`, `1e+16`).
pub fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // `{:e}` writes the shortest digits that read back: `-1.5e-7`, `1e16`.
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    if !(-4..16).contains(&exp) {
        return format!(
            "{sign}{mantissa}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        );
    }
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let point = exp + 1;
    if point <= 0 {
        return format!("{sign}0.{}{digits}", "0".repeat((-point) as usize));
    }
    let point = point as usize;
    let (int, frac) = match digits.len() > point {
        true => (digits[..point].to_string(), digits[point..].to_string()),
        false => (format!("{digits:0<point$}"), "0".to_string()),
    };
    format!("{sign}{int}.{frac}")
}

/// Prints a value as Jinja does in Python: containers as Python's `repr` writes them,
/// `True`, `False`, `None`, floats as Python writes them; strings and the rest as
/// minijinja prints them.
pub fn format(
    out: &mut minijinja::Output<'_>,
    state: &minijinja::State<'_, '_>,
    value: &Value,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Seq
        | ValueKind::Map
        | ValueKind::Iterable
        | ValueKind::Bool
        | ValueKind::None => out.write_str(&repr(value)).map_err(Error::from),
        ValueKind::Number if !value.is_integer() => {
            out.write_str(&repr(value)).map_err(Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python's `repr` of a value (of what a chat template holds: JSON-like data).
pub fn repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(value, &mut out);
    out
}

fn write_repr(value: &Value, out: &mut String) {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => match (value.is_integer(), f64::try_from(value.clone())) {
            (false, Ok(f)) => out.push_str(&python_float(f).replace("Infinity", "inf")),
            _ => out.push_str(&value.to_string()),
        },
        ValueKind::String => repr_str(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(items) = value.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_repr(&item, out);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(keys) = value.try_iter() {
                for (i, key) in keys.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_repr(&key, out);
                    out.push_str(": ");
                    write_repr(&value.get_item(&key).unwrap_or_default(), out);
                }
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
}

/// Python's `repr` of a string: single quotes unless it holds one and no double quote,
/// non-printable characters escaped (the common ones; Python asks Unicode's categories).
fn repr_str(s: &str, out: &mut String) {
    let quote = match s.contains('\'') && !s.contains('"') {
        true => '"',
        false => '\'',
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if is_escape(c) => out.push(c),
            c if (c as u32) < 0x20 || ('\u{7f}'..='\u{a0}').contains(&c) || c == '\u{ad}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            '\u{2028}' | '\u{2029}' | '\u{200b}'..='\u{200f}' | '\u{feff}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// `strftime_now(format)`: the time now (UTC) in a C `strftime` format, as transformers
/// gives templates (Llama 3.x write today's date with it).
pub fn strftime_now(format: String) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// `format` for the UTC time `secs` after the epoch: the directives of C's `strftime`
/// that do not depend on a locale's data beyond English names.
fn strftime(format: &str, secs: i64) -> Result<String, Error> {
    let days = secs.div_euclid(86_400);
    let in_day = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let year_day = days - days_from_civil(year, 1, 1) + 1;
    let (hour, minute, second) = (in_day / 3600, in_day / 60 % 60, in_day % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('j') => write!(out, "{year_day:03}"),
            Some('B') => write!(out, "{}", MONTHS[month as usize - 1]),
            Some('b' | 'h') => write!(out, "{}", &MONTHS[month as usize - 1][..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('u') => write!(out, "{}", weekday + 1),
            Some('w') => write!(out, "{}", (weekday + 1) % 7),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('F') => write!(out, "{year}-{month:02}-{day:02}"),
            Some('T') => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            Some('Z') => write!(out, "UTC"),
            Some('z') => write!(out, "+0000"),
            Some('%') => write!(out, "%"),
            other => {
                return Err(invalid(format!(
                    "strftime_now: unsupported directive %{}",
                    other.map(String::from).unwrap_or_default()
                )))
            }
        };
    }
    Ok(out)
}

/// The proleptic Gregorian date (year, month, day) of a day count from 1970-01-01
/// (Howard Hinnant's algorithm).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The day count from 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `source` with transformers' `{% generation %}…{% endgeneration %}` (which marks the
/// assistant's text for training masks, and renders its body) as a block that always
/// renders, whitespace control kept: minijinja has no such tag.
pub fn generation_blocks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let body = inner
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+']);
        let (open, close) = (
            &inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()],
            &inner[inner.trim_end_matches(['-', '+']).len()..],
        );
        match body.trim() {
            "generation" => {
                let _ = write!(out, "{{%{open} if true {close}%}}");
            }
            "endgeneration" => {
                let _ = write!(out, "{{%{open} endif {close}%}}");
            }
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, ctx: Value) -> String {
        let mut env = minijinja::Environment::new();
        env.add_filter("tojson", tojson);
        env.set_formatter(format);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.render_str(&generation_blocks(source), ctx)
            .expect("renders")
    }

    /// `json.dumps`' outputs, written by Python 3.12.
    #[test]
    fn tojson_takes_json_dumps_arguments() {
        let v = Value::from_serialize(serde_json::json!({"b": 1, "a": ["é", 1.5e-7, {}], "c": []}));
        let ctx = minijinja::context! { v => v };
        assert_eq!(
            render("{{ v | tojson }}", ctx.clone()),
            r#"{"b": 1, "a": ["é", 1.5e-07, {}], "c": []}"#
        );
        assert_eq!(
            render(
                "{{ v | tojson(ensure_ascii=True, sort_keys=True) }}",
                ctx.clone()
            ),
            r#"{"a": ["\u00e9", 1.5e-07, {}], "b": 1, "c": []}"#
        );
        assert_eq!(
            render("{{ v | tojson(separators=(',', ':')) }}", ctx.clone()),
            r#"{"b":1,"a":["é",1.5e-07,{}],"c":[]}"#
        );
        assert_eq!(
            render("{{ v | tojson(indent=2) }}", ctx.clone()),
            "{\n  \"b\": 1,\n  \"a\": [\n    \"é\",\n    1.5e-07,\n    {}\n  ],\n  \"c\": []\n}"
        );
        assert_eq!(
            render("{{ '😀' | tojson(ensure_ascii=True) }}", ctx),
            r#""\ud83d\ude00""#
        );
    }

    #[test]
    fn floats_are_written_as_python_writes_them() {
        for (x, python) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123.456, "123.456"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (-2.5e-300, "-2.5e-300"),
        ] {
            assert_eq!(python_float(x), python, "{x}");
        }
    }

    /// Values printed without `tojson`, as jinja2 prints them.
    #[test]
    fn values_print_as_python_prints_them() {
        let ctx = minijinja::context! {
            call => Value::from_serialize(serde_json::json!({"city": "Paris", "n": [1, 2.5, true, null]})),
            quoted => "it's",
        };
        assert_eq!(
            render(
                "{{ call }}|{{ 'a,b'.split(',') }}|{{ true }}|{{ none }}|{{ 0.5 }}|{{ 3 }}",
                ctx.clone()
            ),
            "{'city': 'Paris', 'n': [1, 2.5, True, None]}|['a', 'b']|True|None|0.5|3"
        );
        assert_eq!(
            render("{{ [quoted, 'a\\nb'] }}", ctx),
            r#"["it's", 'a\nb']"#
        );
    }

    #[test]
    fn generation_blocks_render_their_body() {
        assert_eq!(
            render(
                "a {%- generation %} b {% endgeneration -%} c",
                Value::UNDEFINED
            ),
            "a b c"
        );
        assert_eq!(
            render(
                "{% generation %}x{% endgeneration %}{{ '{%' }}",
                Value::UNDEFINED
            ),
            "x{%"
        );
    }

    #[test]
    fn strftime_writes_c_directives() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let secs = days_from_civil(2024, 7, 26) * 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(
            strftime("%d %b %Y|%B %e|%A %a|%F %T|%j|%I%p|%%", secs).unwrap(),
            "26 Jul 2024|July 26|Friday Fri|2024-07-26 13:05:09|208|01PM|%"
        );
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));
        assert!(strftime("%Q", 0).is_err());
    }
}
