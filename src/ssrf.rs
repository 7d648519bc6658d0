//! Server-side request forgery guard: outbound requests that a client or an API user chooses
//! (webhook targets, dynamic proxy upstreams) may not reach private, loopback, link-local or
//! cloud metadata addresses unless the deployment allows it (`webhooks.allow_private_targets`,
//! `proxy.allow_private`).
//!
//! The check happens after DNS resolution, inside the HTTP client's resolver
//! ([`GuardedResolver`]), so the connection goes only to an address that was checked (no
//! second lookup that DNS rebinding could answer differently). Hosts written as IP literals
//! bypass resolvers, so [`check_url`] checks them before every attempt. Redirects are never
//! followed by the webhook client (`redirect::Policy::none()`); the proxy's client checks every
//! redirect target itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not http or https, or no host.
    #[error("expected an absolute http or https URL with a host, got {0:?}")]
    NotHttp(String),
    /// The address is in a forbidden range.
    #[error(
        "refused: {host} is {address}, a {range} address; only public addresses may be reached \
         (internal deployments can allow private ones: webhooks.allow_private_targets, \
         proxy.allow_private)"
    )]
    Forbidden {
        /// The host as written.
        host: String,
        /// The offending address.
        address: IpAddr,
        /// Which range it is in.
        range: &'static str,
    },
    /// The name did not resolve.
    #[error("cannot resolve {host}: {message}")]
    Unresolvable {
        /// The host as written.
        host: String,
        /// The resolver's error.
        message: String,
    },
}

/// The forbidden range `ip` is in, if any.
pub fn forbidden_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) => {
            "cloud metadata"
        }
        (0, _, _) => "unspecified (\"this network\")",
        (127, _, _) => "loopback",
        (10, _, _) | (192, 168, _) => "private",
        (172, 16..=31, _) => "private",
        (169, 254, _) => "link-local",
        (100, 64..=127, _) => "shared (carrier-grade NAT)",
        (192, 0, 0) => "IETF protocol assignment",
        (198, 18..=19, _) => "benchmarking",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved or broadcast",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let segments = ip.segments();
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) embed an IPv4 address that is what is reached.
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = segments[6].to_be_bytes();
        let [c, d] = segments[7].to_be_bytes();
        return forbidden_v4(Ipv4Addr::new(a, b, c, d));
    }
    if segments[0] == 0x2002 {
        let [a, b] = segments[1].to_be_bytes();
        let [c, d] = segments[2].to_be_bytes();
        return forbidden_v4(Ipv4Addr::new(a, b, c, d));
    }
    Some(match segments[0] {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        0xfd00 if segments[1..] == [0xec2, 0, 0, 0, 0, 0, 0x254] => "cloud metadata",
        s if s & 0xfe00 == 0xfc00 => "unique local (private)",
        s if s & 0xffc0 == 0xfe80 => "link-local",
        s if s & 0xffc0 == 0xfec0 => "site-local (private)",
        s if s & 0xff00 == 0xff00 => "multicast",
        // IPv4-compatible (deprecated) ::a.b.c.d
        0 if segments[1..6] == [0, 0, 0, 0, 0] => "IPv4-compatible",
        _ => return None,
    })
}

fn http_host(url: &Url) -> Result<Host<&str>, TargetError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(TargetError::NotHttp(
            crate::redact::Redacted::new(url).to_string(),
        ));
    }
    url.host()
        .filter(|h| !matches!(h, Host::Domain(d) if d.is_empty()))
        .ok_or_else(|| TargetError::NotHttp(crate::redact::Redacted::new(url).to_string()))
}

/// Checks the scheme, and the address when the host is an IP literal (names are checked when
/// they resolve). Pure: used at registration and before every attempt.
pub fn check_url(url: &Url, allow_private: bool) -> Result<(), TargetError> {
    let host = http_host(url)?;
    if allow_private {
        return Ok(());
    }
    let ip = match host {
        Host::Ipv4(v4) => IpAddr::V4(v4),
        Host::Ipv6(v6) => IpAddr::V6(v6),
        Host::Domain(_) => return Ok(()),
    };
    match forbidden_range(ip) {
        Some(range) => Err(TargetError::Forbidden {
            host: url.host_str().unwrap_or_default().to_owned(),
            address: ip,
            range,
        }),
        None => Ok(()),
    }
}

/// Resolves `host` and keeps only permitted addresses; an error when none is left.
pub async fn resolve_checked(
    host: &str,
    port: u16,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, TargetError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| TargetError::Unresolvable {
            host: host.to_owned(),
            message: e.to_string(),
        })?
        .collect();
    if allow_private {
        return Ok(addrs);
    }
    let mut refused = None;
    let permitted: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| match forbidden_range(a.ip()) {
            Some(range) => {
                refused.get_or_insert((a.ip(), range));
                false
            }
            None => true,
        })
        .collect();
    match (permitted.is_empty(), refused) {
        (true, Some((address, range))) => Err(TargetError::Forbidden {
            host: host.to_owned(),
            address,
            range,
        }),
        (true, None) => Err(TargetError::Unresolvable {
            host: host.to_owned(),
            message: "no addresses".into(),
        }),
        (false, _) => Ok(permitted),
    }
}

/// Checks a target at registration: scheme, IP literal, and (for names) what it resolves to.
pub async fn check_target(url: &Url, allow_private: bool) -> Result<(), TargetError> {
    check_url(url, allow_private)?;
    if let (Some(Host::Domain(name)), false) = (url.host(), allow_private) {
        let port = url.port_or_known_default().unwrap_or(443);
        resolve_checked(name, port, false).await?;
    }
    Ok(())
}

/// The delivery client's resolver: resolves with the system resolver and hands the client only
/// permitted addresses, so it connects to exactly what was checked.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    /// Whether private targets are allowed.
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = resolve_checked(&host, 0, allow_private).await?;
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn private_loopback_link_local_and_metadata_are_forbidden() {
        for (addr, range) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.0.7", "link-local"),
            ("169.254.169.254", "cloud metadata"),
            ("100.100.100.200", "cloud metadata"),
            ("0.0.0.0", "unspecified (\"this network\")"),
            ("100.64.0.1", "shared (carrier-grade NAT)"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("fc00::1", "unique local (private)"),
            ("fd12:3456::1", "unique local (private)"),
            ("fd00:ec2::254", "cloud metadata"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("64:ff9b::a00:1", "private"),
            ("2002:c0a8:0101::1", "private"),
            ("ff02::1", "multicast"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved or broadcast"),
        ] {
            assert_eq!(forbidden_range(ip(addr)), Some(range), "{addr}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "2002:0808:0808::1",
        ] {
            assert_eq!(forbidden_range(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn urls_are_checked_for_scheme_and_literal_addresses() {
        let url = |s: &str| Url::parse(s).unwrap();
        assert!(check_url(&url("https://example.com/hook"), false).is_ok());
        assert!(check_url(&url("http://8.8.8.8/hook"), false).is_ok());
        let err = check_url(&url("http://127.0.0.1:9/hook"), false).unwrap_err();
        assert!(
            err.to_string()
                .contains("127.0.0.1 is 127.0.0.1, a loopback address"),
            "{err}"
        );
        assert!(err.to_string().contains("allow_private_targets"), "{err}");
        assert!(check_url(&url("http://[::1]:9/"), false).is_err());
        assert!(check_url(&url("http://[::ffff:10.0.0.1]/"), false).is_err());
        assert!(check_url(&url("http://127.0.0.1:9/hook"), true).is_ok());
        assert!(matches!(
            check_url(&url("ftp://example.com/"), true),
            Err(TargetError::NotHttp(_))
        ));
        assert!(matches!(
            check_url(&url("file:///etc/passwd"), true),
            Err(TargetError::NotHttp(_))
        ));
    }

    #[tokio::test]
    async fn names_are_checked_after_resolution() {
        let err = resolve_checked("localhost", 80, false).await.unwrap_err();
        assert!(
            matches!(
                err,
                TargetError::Forbidden {
                    range: "loopback",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            !resolve_checked("localhost", 80, true)
                .await
                .unwrap()
                .is_empty()
        );
        let err = check_target(&Url::parse("http://localhost:8/x").unwrap(), false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("localhost"), "{err}");
    }

    proptest! {
        /// Every IPv4 address embedded in an IPv4-mapped IPv6 address gets the same verdict.
        #[test]
        fn mapped_addresses_get_the_ipv4_verdict(bits in any::<u32>()) {
            let v4 = Ipv4Addr::from(bits);
            prop_assert_eq!(forbidden_range(IpAddr::V4(v4)), forbidden_range(IpAddr::V6(v4.to_ipv6_mapped())));
        }
    }
}
