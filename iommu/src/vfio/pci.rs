//! PCI function addresses (`0000:00:03.0`): parsing and printing.

use std::fmt;
use std::str::FromStr;

/// A PCI function address, `domain:bus:device.function` (`0000:00:03.0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// PCI segment (domain).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number, below 32.
    pub device: u8,
    /// Function number, below 8.
    pub function: u8,
}

/// Why a string is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a PCI address like 0000:00:03.0: {reason}")]
pub struct PciAddressError {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for PciAddress {
    type Err = PciAddressError;

    /// Parses `DDDD:BB:DD.F`, or `BB:DD.F` with domain 0 (as `lspci` prints it).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason| PciAddressError {
            text: text.to_string(),
            reason,
        };
        let (rest, function) = text
            .rsplit_once('.')
            .ok_or_else(|| err("missing '.function'"))?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, s] => (*d, *b, *s),
            [b, s] => ("0", *b, *s),
            _ => return Err(err("expected domain:bus:device.function")),
        };
        let hex = |s: &str, max_digits: usize, what| {
            if s.is_empty() || s.len() > max_digits || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(err(what));
            }
            u32::from_str_radix(s, 16).map_err(|_| err(what))
        };
        let domain = hex(domain, 4, "domain must be 1-4 hex digits")?;
        let bus = hex(bus, 2, "bus must be 1-2 hex digits")?;
        let device = hex(device, 2, "device must be 1-2 hex digits")?;
        let function = hex(function, 1, "function must be one digit 0-7")?;
        if device >= 32 {
            return Err(err("device must be below 0x20"));
        }
        if function >= 8 {
            return Err(err("function must be 0-7"));
        }
        Ok(PciAddress {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for PciAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn pci_address_round_trips_and_accepts_short_form() {
        let a = addr("0000:00:03.0");
        assert_eq!(
            a,
            PciAddress {
                domain: 0,
                bus: 0,
                device: 3,
                function: 0
            }
        );
        assert_eq!(a.to_string(), "0000:00:03.0");
        assert_eq!(addr("1f:1c.7").to_string(), "0000:1f:1c.7");
        assert_eq!(addr("abcd:ff:1f.7").to_string(), "abcd:ff:1f.7");
    }

    #[test]
    fn pci_address_rejects_each_malformed_part_with_a_reason() {
        for (text, reason) in [
            ("0000:00:03", "missing '.function'"),
            ("0000:00:20.0", "device must be below 0x20"),
            ("0000:00:03.8", "function must be 0-7"),
            ("0000:00:03.10", "function must be one digit 0-7"),
            ("00000:00:03.0", "domain must be 1-4 hex digits"),
            ("0000:100:03.0", "bus must be 1-2 hex digits"),
            ("0000:0g:03.0", "bus must be 1-2 hex digits"),
            ("03.0", "expected domain:bus:device.function"),
            ("0:0:0:0.0", "expected domain:bus:device.function"),
            ("0000:00:+3.0", "device must be 1-2 hex digits"),
        ] {
            let err = text.parse::<PciAddress>().unwrap_err();
            assert_eq!(err.reason, reason, "{text}");
            assert!(err.to_string().contains(text));
        }
    }
}
