//! Trace files: recorded or hand-written requests, one per line.
//!
//! ```text
//! # dma-map trace v2: <time_ns> <shared|private|plug-shared|plug-private|unplug> <gpa hex> <len hex>
//! # '#' starts a comment (whole line or after the fields); blank lines are ignored.
//! unplugged 0x4000000 0x4000000          # before any request: starts unplugged
//! 0        shared   0x100000  0x1000
//! 5000     private  0x100000  0x1000   # back to private after the DMA
//! 10000    plug-private 0x4000000 0x200000
//! 15000    unplug   0x4000000 0x200000
//! ```
//! - `time_ns`: decimal nanoseconds since the start, never decreasing from one line to the next.
//! - the kind: `shared` or `private` (a conversion to that attribute), `plug-shared` or
//!   `plug-private` (the VMM plugs the range, which takes that attribute), `unplug`.
//! - `gpa`, `len`: hexadecimal (the `0x` prefix is optional), relative to the region base, both
//!   multiples of 4 KiB, `len > 0`, and the whole range inside the region.
//! - `unplugged <gpa hex> <len hex>` lines, before every request, say what starts unplugged
//!   (a virtio-mem device's memory); without them the whole region starts plugged.
//!
//! Version 1 traces (conversions only, the whole region plugged) are version 2 traces.
//! Every error names the line it is on, so a trace of a million lines can be fixed.

use std::fmt;

use crate::{Action, Extents, PAGE, Request, Target, Workload};

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
    /// Neither four fields (a request) nor three (an `unplugged` line).
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
    /// The kind is none of `shared`, `private`, `plug-shared`, `plug-private`, `unplug`.
    BadKind(String),
    /// An `unplugged` line after a request: the state at the start comes first.
    UnpluggedAfterRequests,
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
                "expected 4 fields '<time_ns> <kind> <gpa hex> <len hex>' or 3 'unplugged <gpa \
                 hex> <len hex>', found {found}"
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
            TraceErrorKind::BadKind(d) => write!(
                f,
                "request kind '{d}' must be 'shared' or 'private' (a conversion), \
                 'plug-shared', 'plug-private' or 'unplug'"
            ),
            TraceErrorKind::UnpluggedAfterRequests => write!(
                f,
                "'unplugged' lines give the region's state at the start: put them before every \
                 request"
            ),
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

/// One line of a trace.
enum Line {
    /// A request.
    Request(Request),
    /// `[gpa, gpa + len)` starts unplugged.
    Unplugged { gpa: u64, len: u64 },
}

fn parse_kind(kind: &str) -> Result<Action, TraceErrorKind> {
    Ok(match kind.to_ascii_lowercase().as_str() {
        "shared" => Action::Convert(Target::Shared),
        "private" => Action::Convert(Target::Private),
        "plug-shared" => Action::Plug(Target::Shared),
        "plug-private" => Action::Plug(Target::Private),
        "unplug" => Action::Unplug,
        _ => return Err(TraceErrorKind::BadKind(kind.to_string())),
    })
}

/// The range `gpa`, `len` name, checked against the region.
fn parse_range(gpa: &str, len: &str, region_size: u64) -> Result<(u64, u64), TraceErrorKind> {
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
    Ok((gpa, len))
}

fn parse_line(fields: &[&str], region_size: u64) -> Result<Line, TraceErrorKind> {
    match fields {
        [word, gpa, len] if word.eq_ignore_ascii_case("unplugged") => {
            let (gpa, len) = parse_range(gpa, len, region_size)?;
            Ok(Line::Unplugged { gpa, len })
        }
        [time, kind, gpa, len] => {
            let time_ns = time
                .parse()
                .map_err(|_| TraceErrorKind::BadTime(time.to_string()))?;
            let action = parse_kind(kind)?;
            let (gpa, len) = parse_range(gpa, len, region_size)?;
            Ok(Line::Request(Request {
                time_ns,
                action,
                gpa,
                len,
            }))
        }
        _ => Err(TraceErrorKind::FieldCount {
            found: fields.len(),
        }),
    }
}

/// Parses a trace for a region of `region_size` bytes; `name` labels the workload.
///
/// # Errors
/// The first bad line, with its number; [`TraceErrorKind::Empty`] (line 0) for a trace without
/// requests.
pub fn parse(text: &str, region_size: u64, name: &str) -> Result<Workload, TraceError> {
    let mut requests: Vec<Request> = Vec::new();
    let mut unplugged = Extents::default();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split('#').next().unwrap_or("");
        let fields: Vec<&str> = content.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let error = |kind| TraceError { line, kind };
        let request = match parse_line(&fields, region_size).map_err(error)? {
            Line::Unplugged { .. } if !requests.is_empty() => {
                return Err(error(TraceErrorKind::UnpluggedAfterRequests));
            }
            Line::Unplugged { gpa, len } => {
                unplugged.insert(gpa, gpa + len);
                continue;
            }
            Line::Request(request) => request,
        };
        if let Some(previous) = requests.last() {
            if request.time_ns < previous.time_ns {
                return Err(error(TraceErrorKind::TimeGoesBack {
                    time_ns: request.time_ns,
                    previous_ns: previous.time_ns,
                }));
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
        unplugged_at_start: unplugged.to_vec(),
        requests,
    })
}

/// Writes `workload` in the trace format, so any generated workload can be saved, edited and
/// replayed with `--trace`.
pub fn format(workload: &Workload) -> String {
    let mut out = format!(
        "# dma-map trace v2: <time_ns> <shared|private|plug-shared|plug-private|unplug> <gpa hex> \
         <len hex>\n# {}\n",
        workload.name
    );
    for &(start, end) in &workload.unplugged_at_start {
        out.push_str(&format!("unplugged {start:#x} {:#x}\n", end - start));
    }
    for r in &workload.requests {
        out.push_str(&format!(
            "{} {} {:#x} {:#x}\n",
            r.time_ns, r.action, r.gpa, r.len
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BounceArea, FirmwareBounce, VirtioMem, firmware_bounce, virtio_mem};

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
                    action: Action::Convert(Target::Shared),
                    gpa: 0x1000,
                    len: 0x2000
                },
                Request {
                    time_ns: 10,
                    action: Action::Convert(Target::Private),
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
            ("0 public 0 1000", TraceErrorKind::BadKind("public".into())),
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

    #[test]
    fn a_version_1_trace_parses_as_conversions_over_a_plugged_region() {
        // Written by the v1 formatter, before traces could plug: it reads as it always did.
        let v1 = "# dma-map trace v1: <time_ns> <shared|private> <gpa hex> <len hex>\n\
                  # firmware-bounce (2 transactions, seed 1)\n\
                  0 shared 0x3000 0x2000\n5000 private 0x3000 0x2000\n\
                  10000 shared 0xff000 0x1000\n15000 private 0xff000 0x1000\n";
        let w = parse(v1, REGION, "t").unwrap();
        assert!(w.unplugged_at_start.is_empty());
        assert!(!w.plugs());
        let got: Vec<(u64, Action, u64, u64)> = w
            .requests
            .iter()
            .map(|r| (r.time_ns, r.action, r.gpa, r.len))
            .collect();
        let (shared, private) = (
            Action::Convert(Target::Shared),
            Action::Convert(Target::Private),
        );
        assert_eq!(
            got,
            [
                (0, shared, 0x3000, 0x2000),
                (5000, private, 0x3000, 0x2000),
                (10000, shared, 0xff000, 0x1000),
                (15000, private, 0xff000, 0x1000),
            ]
        );
    }

    #[test]
    fn plugs_unplugs_and_the_unplugged_start_parse_and_format_back() {
        let w = parse(
            "unplugged 0x80000 0x40000\nUNPLUGGED 0xc0000 0x40000 # merges\n\
             0 plug-private 0x80000 0x10000\n1 Plug-Shared 0x90000 0x10000\n\
             2 unplug 0x0 0x10000\n",
            REGION,
            "t",
        )
        .unwrap();
        assert_eq!(w.unplugged_at_start, [(0x80000, REGION)]);
        let actions: Vec<Action> = w.requests.iter().map(|r| r.action).collect();
        assert_eq!(
            actions,
            [
                Action::Plug(Target::Private),
                Action::Plug(Target::Shared),
                Action::Unplug
            ]
        );
        let generated = virtio_mem(64 << 20, VirtioMem { steps: 300 }, 2).unwrap();
        let back = parse(&format(&generated), 64 << 20, "t").unwrap();
        assert_eq!(back.unplugged_at_start, generated.unplugged_at_start);
        assert_eq!(back.requests, generated.requests);
    }

    #[test]
    fn an_unplugged_line_after_a_request_is_refused() {
        let e = error_of("0 shared 0 0x1000\nunplugged 0x10000 0x1000\n");
        assert_eq!(
            e,
            TraceError {
                line: 2,
                kind: TraceErrorKind::UnpluggedAfterRequests
            }
        );
        assert_eq!(
            error_of("unplugged 0x10000 0x800\n0 shared 0 0x1000\n").kind,
            TraceErrorKind::Unaligned {
                gpa: 0x10000,
                len: 0x800
            }
        );
        assert_eq!(
            error_of("0 replug 0 0x1000\n").kind,
            TraceErrorKind::BadKind("replug".into())
        );
    }
}
