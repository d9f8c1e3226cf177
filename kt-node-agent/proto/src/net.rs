//! Address ranges, as both sides name them: routes and `--includeIps`/`--excludeIps` on the
//! workstation, the pod and Service ranges of a `connect` session, the agent's egress rule.

use std::{fmt, net::IpAddr, str::FromStr};

/// An address range, `10.244.0.0/16`; ordered by address, then prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

/// A range that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not an address range (address/prefix)")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || CidrError(text.to_owned());
        let (address, prefix) = text.split_once('/').ok_or_else(bad)?;
        let network: IpAddr = address.trim().parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.trim().parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad());
        }
        Ok(Self::new(network, prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    /// The range of `prefix` bits around `address` (host bits cleared).
    pub fn new(address: IpAddr, prefix: u8) -> Self {
        let network = match address {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Self { network, prefix }
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Self::new(address, self.prefix).network == self.network
            }
            _ => false,
        }
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The first address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// Whether the two ranges share an address (one holds the other).
    pub fn overlaps(&self, other: &Self) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    /// The two ranges one bit longer that make this one (itself twice for a single address).
    pub fn halves(&self) -> (Self, Self) {
        let max = if self.network.is_ipv4() { 32 } else { 128 };
        if self.prefix >= max {
            return (*self, *self);
        }
        let prefix = self.prefix + 1;
        let high = match self.network {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) | (1u32 << (32 - u32::from(prefix)))).into()),
            IpAddr::V6(a) => {
                IpAddr::V6((u128::from(a) | (1u128 << (128 - u32::from(prefix)))).into())
            }
        };
        (Self::new(self.network, prefix), Self::new(high, prefix))
    }
}

/// The smallest octet-aligned ranges (/8, /16, /24, /32) that hold every address of
/// `addresses`, addresses sharing their first two octets merged (v0.3.7's rule for Service
/// ranges when the API does not tell them).
pub fn covering_ranges(addresses: impl IntoIterator<Item = IpAddr>) -> Vec<Cidr> {
    let mut groups: std::collections::BTreeMap<[u8; 2], Vec<[u8; 4]>> = Default::default();
    for address in addresses {
        if let IpAddr::V4(a) = address {
            let o = a.octets();
            groups.entry([o[0], o[1]]).or_default().push(o);
        }
    }
    groups
        .into_values()
        .map(|members| {
            let first = members[0];
            let prefix = if members.iter().all(|m| *m == first) {
                32
            } else if members.iter().all(|m| m[2] == first[2]) {
                24
            } else {
                16
            };
            Cidr::new(IpAddr::from(first), prefix)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_split_in_halves_and_overlap() {
        let c: Cidr = "10.244.0.0/16".parse().unwrap();
        let (low, high) = c.halves();
        assert_eq!(
            (low.to_string(), high.to_string()),
            ("10.244.0.0/17".into(), "10.244.128.0/17".into())
        );
        assert!(c.overlaps(&high) && high.overlaps(&c) && !low.overlaps(&high));
        assert_eq!(c.network(), ip("10.244.0.0"));
    }

    #[test]
    fn ranges_parse_and_print() {
        let c: Cidr = "10.96.7.1/12".parse().unwrap();
        assert_eq!(c.to_string(), "10.96.0.0/12");
        assert!(c.contains(ip("10.111.255.255")) && !c.contains(ip("10.112.0.0")));
        assert!(!c.contains(ip("::1")));
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "10.0.0.0/y"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn covering_ranges_merge_by_two_octets() {
        let ranges = covering_ranges(
            [
                "10.96.0.1",
                "10.96.0.10",
                "10.96.3.4",
                "10.97.0.1",
                "10.97.0.1",
            ]
            .map(ip),
        );
        let shown: Vec<String> = ranges.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.96.0.0/16", "10.97.0.1/32"]);
        let one_subnet = covering_ranges(["10.96.0.1", "10.96.0.9"].map(ip));
        assert_eq!(one_subnet[0].to_string(), "10.96.0.0/24");
    }
}
