//! PCI addresses: a strict parser, because every sysfs path is built from one.

use std::fmt;
use std::str::FromStr;

use crate::outcome::{Classify, Outcome};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A PCI function address `DDDD:BB:DD.F`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, at most 0x1f.
    pub device: u8,
    /// Function number, at most 7.
    pub function: u8,
}

/// Why a string is not a PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{input}` is not a PCI address ({why}); write it as DDDD:BB:DD.F in hex, e.g. 0000:65:00.0"
)]
pub struct AddressError {
    /// The offending input (shortened, control characters escaped).
    pub input: String,
    /// What was wrong.
    pub why: &'static str,
}

/// A malformed address is the request refused before anything was looked at.
impl Classify for AddressError {
    fn outcome(&self) -> Outcome {
        Outcome::Refused
    }
}

impl PciAddress {
    /// Whether `other` is another function of the same slot (domain, bus and device equal).
    pub fn same_slot(&self, other: &PciAddress) -> bool {
        self.domain == other.domain && self.bus == other.bus && self.device == other.device
    }
}

fn hex_field(s: &str, len: usize) -> Option<u32> {
    (s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
}

impl FromStr for PciAddress {
    type Err = AddressError;

    /// Parse `DDDD:BB:DD.F`. The short form `BB:DD.F` is accepted and means domain `0000`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |why| AddressError {
            input: s.chars().take(40).flat_map(char::escape_default).collect(),
            why,
        };
        let (slot, function) = s.rsplit_once('.').ok_or_else(|| err("no `.F` function"))?;
        let parts: Vec<&str> = slot.split(':').collect();
        let (domain, bus, device) = match parts[..] {
            [d, b, dev] => (
                hex_field(d, 4).ok_or_else(|| err("domain must be 4 hex digits"))?,
                b,
                dev,
            ),
            [b, dev] => (0, b, dev),
            _ => return Err(err("expected DDDD:BB:DD.F")),
        };
        let bus = hex_field(bus, 2).ok_or_else(|| err("bus must be 2 hex digits"))?;
        let device = hex_field(device, 2).ok_or_else(|| err("device must be 2 hex digits"))?;
        if device > 0x1f {
            return Err(err("device must be at most 1f"));
        }
        let function = hex_field(function, 1).ok_or_else(|| err("function must be 1 hex digit"))?;
        if function > 7 {
            return Err(err("function must be at most 7"));
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
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_full_and_short_forms() {
        let a: PciAddress = "0000:65:00.1".parse().unwrap();
        assert_eq!((a.domain, a.bus, a.device, a.function), (0, 0x65, 0, 1));
        assert_eq!("65:00.1".parse::<PciAddress>().unwrap(), a);
        assert_eq!(
            "10DE:FF:1f.7".parse::<PciAddress>().unwrap().to_string(),
            "10de:ff:1f.7"
        );
    }

    #[test]
    fn rejects_malformed_and_path_like_input() {
        for bad in [
            "",
            "0000:65:00",
            "0000:65:20.0",
            "0000:65:00.8",
            "000:65:00.0",
            "0000:665:00.0",
            "../../etc",
            "0000:65:00.0/../x",
            "0000:65:0g.0",
            " 0000:65:00.0",
            "0000:65:00.0\n",
            "+000:65:00.0",
            "0000:65:00.00",
        ] {
            assert!(
                bad.parse::<PciAddress>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    proptest! {
        #[test]
        fn display_then_parse_round_trips(d in any::<u16>(), b in any::<u8>(), dev in 0u8..=0x1f, f in 0u8..=7) {
            let a = PciAddress { domain: d, bus: b, device: dev, function: f };
            prop_assert_eq!(a.to_string().parse::<PciAddress>().unwrap(), a);
        }

        #[test]
        fn parser_never_panics_and_accepted_input_is_canonical(s in "\\PC{0,20}") {
            if let Ok(a) = s.parse::<PciAddress>() {
                // Only hex digits, `:` and `.` can have been accepted: no path characters.
                prop_assert!(s.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.'));
                prop_assert_eq!(a.to_string().parse::<PciAddress>().unwrap(), a);
            }
        }

        #[test]
        fn near_miss_addresses_never_panic(s in "[0-9a-fA-F:./]{0,16}") {
            let _ = s.parse::<PciAddress>();
        }
    }
}
