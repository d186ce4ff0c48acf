//! Trace files: recorded or hand-written conversion requests, one per line.
//!
//! ```text
//! # dma-map trace v1: <time_ns> <shared|private> <gpa hex> <len hex>
//! # '#' starts a comment (whole line or after the fields); blank lines are ignored.
//! 0        shared   0x100000  0x1000
//! 5000     private  0x100000  0x1000   # back to private after the DMA
//! ```
//! - `time_ns`: decimal nanoseconds since the start, never decreasing from one line to the next.
//! - direction: `shared` or `private` (the attribute asked for).
//! - `gpa`, `len`: hexadecimal (the `0x` prefix is optional), relative to the region base, both
//!   multiples of 4 KiB, `len > 0`, and the whole range inside the region.
//!
//! Every error names the line it is on, so a trace of a million lines can be fixed.

use std::fmt;

use crate::{PAGE, Request, Target, Workload};

/// What is wrong with a trace, and on which line (1-based).
#[derive(Debug, PartialEq, Eq)]
pub struct TraceError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong there.
    pub kind: TraceErrorKind,
}

/// The ways a trace line can be wrong.
#[derive(Debug, PartialEq, Eq)]
pub enum TraceErrorKind {
    /// Not exactly four fields.
    FieldCount {
        /// How many there were.
        found: usize,
    },
    /// The time is not a decimal integer.
    BadTime(String),
    /// The time is earlier than the line before.
    TimeGoesBack {
        /// This line's time.
        time_ns: u64,
        /// The previous line's time.
        previous_ns: u64,
    },
    /// The direction is neither `shared` nor `private`.
    BadDirection(String),
    /// An address or length is not hexadecimal.
    BadHex {
        /// `gpa` or `len`.
        field: &'static str,
        /// The text.
        text: String,
    },
    /// Length zero.
    EmptyRange,
    /// Address or length not a multiple of 4 KiB.
    Unaligned {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The range reaches past the region.
    OutsideRegion {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Region size.
        region_size: u64,
    },
    /// The file has no request at all.
    Empty,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: ", self.line)?;
        match &self.kind {
            TraceErrorKind::FieldCount { found } => write!(
                f,
                "expected 4 fields '<time_ns> <shared|private> <gpa hex> <len hex>', found {found}"
            ),
            TraceErrorKind::BadTime(t) => {
                write!(f, "time '{t}' is not a decimal number of nanoseconds")
            }
            TraceErrorKind::TimeGoesBack {
                time_ns,
                previous_ns,
            } => write!(
                f,
                "time {time_ns} is earlier than the previous line's {previous_ns}; sort the trace by time"
            ),
            TraceErrorKind::BadDirection(d) => {
                write!(f, "direction '{d}' must be 'shared' or 'private'")
            }
            TraceErrorKind::BadHex { field, text } => {
                write!(f, "{field} '{text}' is not a hexadecimal number")
            }
            TraceErrorKind::EmptyRange => write!(f, "length is zero"),
            TraceErrorKind::Unaligned { gpa, len } => write!(
                f,
                "range {gpa:#x}+{len:#x} is not aligned to 4 KiB (0x1000)"
            ),
            TraceErrorKind::OutsideRegion {
                gpa,
                len,
                region_size,
            } => write!(
                f,
                "range {gpa:#x}+{len:#x} reaches past the end of the {region_size:#x}-byte region; \
                 pass a larger --region-size"
            ),
            TraceErrorKind::Empty => write!(f, "the trace has no requests"),
        }
    }
}

impl std::error::Error for TraceError {}

fn parse_hex(field: &'static str, text: &str) -> Result<u64, TraceErrorKind> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    u64::from_str_radix(digits, 16).map_err(|_| TraceErrorKind::BadHex {
        field,
        text: text.to_string(),
    })
}

fn parse_line(fields: &[&str], region_size: u64) -> Result<Request, TraceErrorKind> {
    let [time, direction, gpa, len] = fields else {
        return Err(TraceErrorKind::FieldCount {
            found: fields.len(),
        });
    };
    let time_ns = time
        .parse()
        .map_err(|_| TraceErrorKind::BadTime(time.to_string()))?;
    let to = match direction.to_ascii_lowercase().as_str() {
        "shared" => Target::Shared,
        "private" => Target::Private,
        _ => return Err(TraceErrorKind::BadDirection(direction.to_string())),
    };
    let gpa = parse_hex("gpa", gpa)?;
    let len = parse_hex("len", len)?;
    if len == 0 {
        return Err(TraceErrorKind::EmptyRange);
    }
    if gpa % PAGE != 0 || len % PAGE != 0 {
        return Err(TraceErrorKind::Unaligned { gpa, len });
    }
    if gpa.checked_add(len).is_none_or(|end| end > region_size) {
        return Err(TraceErrorKind::OutsideRegion {
            gpa,
            len,
            region_size,
        });
    }
    Ok(Request {
        time_ns,
        to,
        gpa,
        len,
    })
}

/// Parses a trace for a region of `region_size` bytes; `name` labels the workload.
///
/// # Errors
/// The first bad line, with its number; [`TraceErrorKind::Empty`] (line 0) for a trace without
/// requests.
pub fn parse(text: &str, region_size: u64, name: &str) -> Result<Workload, TraceError> {
    let mut requests: Vec<Request> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split('#').next().unwrap_or("");
        let fields: Vec<&str> = content.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let request = parse_line(&fields, region_size).map_err(|kind| TraceError { line, kind })?;
        if let Some(previous) = requests.last() {
            if request.time_ns < previous.time_ns {
                return Err(TraceError {
                    line,
                    kind: TraceErrorKind::TimeGoesBack {
                        time_ns: request.time_ns,
                        previous_ns: previous.time_ns,
                    },
                });
            }
        }
        requests.push(request);
    }
    if requests.is_empty() {
        return Err(TraceError {
            line: 0,
            kind: TraceErrorKind::Empty,
        });
    }
    Ok(Workload {
        name: format!("trace {name} ({} requests)", requests.len()),
        region_size,
        requests,
    })
}

/// Writes `workload` in the trace format, so any generated workload can be saved, edited and
/// replayed with `--trace`.
pub fn format(workload: &Workload) -> String {
    let mut out = format!(
        "# dma-map trace v1: <time_ns> <shared|private> <gpa hex> <len hex>\n# {}\n",
        workload.name
    );
    for r in &workload.requests {
        out.push_str(&format!(
            "{} {} {:#x} {:#x}\n",
            r.time_ns, r.to, r.gpa, r.len
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BounceArea, FirmwareBounce, firmware_bounce};

    const REGION: u64 = 1 << 20;

    fn error_of(text: &str) -> TraceError {
        parse(text, REGION, "t").unwrap_err()
    }

    #[test]
    fn comments_blank_lines_and_both_hex_forms_are_accepted() {
        let w = parse(
            "# header\n\n0 shared 0x1000 0x2000\n  10 PRIVATE 1000 1000 # trailing\n",
            REGION,
            "t",
        )
        .unwrap();
        assert_eq!(
            w.requests,
            [
                Request {
                    time_ns: 0,
                    to: Target::Shared,
                    gpa: 0x1000,
                    len: 0x2000
                },
                Request {
                    time_ns: 10,
                    to: Target::Private,
                    gpa: 0x1000,
                    len: 0x1000
                },
            ]
        );
    }

    #[test]
    fn each_kind_of_bad_line_is_reported_with_its_line_number() {
        let cases: [(&str, TraceErrorKind); 8] = [
            ("0 shared 0x0", TraceErrorKind::FieldCount { found: 3 }),
            ("x shared 0 1000", TraceErrorKind::BadTime("x".into())),
            (
                "0 public 0 1000",
                TraceErrorKind::BadDirection("public".into()),
            ),
            (
                "0 shared 0xg 1000",
                TraceErrorKind::BadHex {
                    field: "gpa",
                    text: "0xg".into(),
                },
            ),
            ("0 shared 0 0", TraceErrorKind::EmptyRange),
            (
                "0 shared 0x800 0x1000",
                TraceErrorKind::Unaligned {
                    gpa: 0x800,
                    len: 0x1000,
                },
            ),
            (
                "0 shared 0xff000 0x2000",
                TraceErrorKind::OutsideRegion {
                    gpa: 0xff000,
                    len: 0x2000,
                    region_size: REGION,
                },
            ),
            (
                "0 shared 0xffffffffffff000 0xfffffffffffff000",
                TraceErrorKind::OutsideRegion {
                    gpa: 0xffffffffffff000,
                    len: 0xfffffffffffff000,
                    region_size: REGION,
                },
            ),
        ];
        for (bad, kind) in cases {
            let text = format!("# ok\n0 shared 0 0x1000\n{bad}\n");
            assert_eq!(error_of(&text), TraceError { line: 3, kind }, "{bad}");
        }
    }

    #[test]
    fn time_going_back_is_an_error_on_the_later_line() {
        let e = error_of("5 shared 0 1000\n4 private 0 1000\n");
        assert_eq!(e.line, 2);
        assert!(
            e.to_string().starts_with("line 2: time 4 is earlier"),
            "{e}"
        );
    }

    #[test]
    fn a_trace_without_requests_is_refused() {
        assert_eq!(error_of("# nothing\n\n").kind, TraceErrorKind::Empty);
    }

    #[test]
    fn a_formatted_workload_parses_back_unchanged() {
        let params = FirmwareBounce {
            transactions: 50,
            area: BounceArea::Anywhere,
        };
        let w = firmware_bounce(REGION, params, 3).unwrap();
        let back = parse(&format(&w), REGION, "t").unwrap();
        assert_eq!(back.requests, w.requests);
    }
}
