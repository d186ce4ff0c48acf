//! Byte sizes as people write them (`64M`, `1G`, `4096`, `0x1000`) and as the reports print them.

pub use workloads::Bytes;

/// Parses `4096`, `0x1000`, `4K`, `64M`, `1G`, `2GiB`, `1T` (binary multiples, case-insensitive).
///
/// # Errors
/// A sentence naming the text and the accepted forms.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "'{text}' is not a size: write bytes (4096, 0x1000) or a number with K, M, G or T (64M, 1G)"
        )
    };
    let t = text.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, suffix) = t.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large for a 64-bit byte count"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_every_accepted_form() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2 T"), Ok(2 << 40));
    }

    #[test]
    fn bad_sizes_say_what_is_accepted() {
        let e = parse_size("lots").unwrap_err();
        assert!(e.contains("'lots'") && e.contains("64M"), "{e}");
        assert!(parse_size("12Q").is_err());
        assert!(
            parse_size("99999999999T")
                .unwrap_err()
                .contains("too large")
        );
    }
}
