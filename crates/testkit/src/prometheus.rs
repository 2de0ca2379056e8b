//! The Prometheus text exposition format, parsed strictly enough to call a `/metrics` answer
//! valid: metric and label names, quoted and escaped label values, values (with `+Inf`,
//! `-Inf`, `NaN`), optional timestamps, and the `TYPE` and `HELP` comments. `Site::scrape` and
//! `Site::metric` read a site's metrics with it.

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    /// `(name, value)` in the order written, values unescaped.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

/// Parses one sample line: `name{label="value",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        loop {
            while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
                chars.next();
            }
            let Some(&(start, c)) = chars.peek() else {
                return Err("unterminated label set".into());
            };
            if c == '}' {
                chars.next();
                rest = &after[start + 1..];
                break;
            }
            let mut key_end = start;
            while let Some(&(i, c)) = chars.peek() {
                if c == '=' {
                    key_end = i;
                    break;
                }
                chars.next();
            }
            let key = after[start..key_end].trim();
            if !is_label_name(key) {
                return Err(format!("bad label name {key:?}"));
            }
            chars.next(); // '='
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} has no quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    None => return Err("unterminated label value".into()),
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some((_, c)) => value.push(c),
                }
            }
            labels.push((key.to_owned(), value));
            while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
                chars.next();
            }
            match chars.peek() {
                Some((_, ',')) => {
                    chars.next();
                }
                Some((_, '}')) => {}
                other => return Err(format!("expected , or }} after a label, got {other:?}")),
            }
        }
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = parse_float(value).ok_or_else(|| format!("bad value {value:?}"))?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("bad timestamp {timestamp:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing text".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses a whole exposition, panicking on the first line that is not valid.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            match words.first() {
                Some(&"TYPE") => {
                    assert!(
                        words.len() == 3
                            && is_metric_name(words[1])
                            && ["counter", "gauge", "histogram", "summary", "untyped"]
                                .contains(&words[2]),
                        "line {}: bad TYPE comment: {line}",
                        n + 1
                    );
                }
                Some(&"HELP") => {
                    assert!(
                        words.len() >= 2 && is_metric_name(words[1]),
                        "line {}: bad HELP comment: {line}",
                        n + 1
                    );
                }
                _ => {}
            }
            continue;
        }
        match parse_sample(line) {
            Ok(sample) => samples.push(sample),
            Err(e) => panic!("line {}: {e}: {line}", n + 1),
        }
    }
    samples
}

/// The sum of the samples named `name` whose labels include all of `labels`; `None` when
/// there is none.
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_parser_accepts_and_refuses() {
        let good =
            "# HELP a_total Things.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\\n\"} 3\n\
                    b 1.5e3 1700000000000\nc{} +Inf\nd{le=\"0.5\",} NaN\n";
        let samples = parse(good);
        assert_eq!(samples.len(), 4);
        assert_eq!(
            samples[0].labels,
            [("x".into(), "1".into()), ("y".into(), "q\"\\\n".into())]
        );
        assert_eq!(samples[1].value, 1500.0);
        assert_eq!(metric(&samples, "a_total", &[("x", "1")]), Some(3.0));
        assert_eq!(metric(&samples, "a_total", &[("x", "2")]), None);
        for bad in [
            "1abc 1",
            "a{x=1} 1",
            "a{x=\"1\" 1",
            "a one",
            "a 1 2 3",
            "a{x-y=\"1\"} 1",
        ] {
            assert!(parse_sample(bad).is_err(), "{bad}");
        }
    }
}
