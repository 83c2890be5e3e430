//! # ip: allow or deny clients by their address
//!
//! When a client opens an export its address is checked against the
//! allow list, then the deny list:
//!
//! 1. if it matches any rule in the allow list, it may connect;
//! 2. else if it matches any rule in the deny list, it is refused;
//! 3. else it may connect.
//!
//! A refused client gets `NBD_REP_ERR_POLICY` ("client not permitted to
//! connect because of source address restriction"). The order of the
//! parameters does not matter; without either the filter does nothing.
//!
//! ```text
//! nbdkit --filter=ip file disk.img allow=127.0.0.1,::1 deny=all
//! nbdkit --filter=ip file disk.img deny=8.0.0.0/8
//! nbdkit --filter=ip file disk.img allow=anyipv6 deny=all
//! ```
//!
//! ## Parameters
//!
//! `allow=RULE[,RULE...]` and `deny=RULE[,RULE...]` (each may
//! be given several times; the lists add up). A rule is one of:
//!
//! - `all` or `any`: any client;
//! - `allipv4`/`anyipv4`, `allipv6`/`anyipv6`: any TCP client over IPv4
//!   or IPv6;
//! - `allunix`/`anyunix`: any client on a Unix domain socket (or `-s`);
//! - `allvsock`/`anyvsock`, `vsock-cid:CID`, `vsock-port:PORT`: AF_VSOCK
//!   clients, which this server does not accept, so these never match;
//! - `A.B.C.D`, `A.B.C.D/NN`, `A:B:...`, `A:B:.../NN`: an IPv4 or IPv6
//!   address or network (an IPv4-mapped IPv6 client matches IPv4 rules);
//! - `pid:PID`, `uid:UID`, `gid:GID`: the process, (effective) user or
//!   group of a client on a Unix domain socket, from its credentials
//!   (`SO_PEERCRED`); never a TCP client, nor `-s` on a pipe;
//! - `security:LABEL`: a Unix socket client whose security label
//!   (`SO_PEERSEC`, SELinux's for example) is LABEL (as nbdkit 1.34;
//!   never matches on a system without labels).
//!
//! Export listings (`NBD_OPT_LIST`) are not filtered, as the server
//! gives filters no client address for them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{
    ConfigError, ConfigResult, Error, Filter, FilterEntry, Handle, Next, OpenContext, Params,
    PeerCred, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "ip",
    help: "\
allow=addr[,addr...]     Set allow list.
deny=addr[,addr...]      Set deny list.",
    create,
};

/// One allow or deny rule.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Any,
    AnyIpv4,
    AnyIpv6,
    AnyUnix,
    AnyVsock,
    Ipv4(Ipv4Addr, u8),
    Ipv6(Ipv6Addr, u8),
    Pid(u32),
    Uid(u32),
    Gid(u32),
    Security(String),
    VsockCid(u32),
    VsockPort(u32),
}

fn parse_rule(key: &str, list: &str, word: &str) -> ConfigResult<Rule> {
    let bad = || ConfigError::new(format!("don't know how to parse rule: {key}={list}"));
    let number = |v: &str| v.trim().parse::<u32>().map_err(|_| bad());
    let w = word.trim();
    Ok(match w {
        "all" | "any" => Rule::Any,
        "allipv4" | "anyipv4" => Rule::AnyIpv4,
        "allipv6" | "anyipv6" => Rule::AnyIpv6,
        "allunix" | "anyunix" => Rule::AnyUnix,
        "allvsock" | "anyvsock" => Rule::AnyVsock,
        _ => {
            if let Some(v) = w.strip_prefix("pid:") {
                Rule::Pid(number(v)?)
            } else if let Some(v) = w.strip_prefix("uid:") {
                Rule::Uid(number(v)?)
            } else if let Some(v) = w.strip_prefix("gid:") {
                Rule::Gid(number(v)?)
            } else if let Some(v) = w.strip_prefix("security:") {
                if v.is_empty() {
                    return Err(bad());
                }
                Rule::Security(v.to_string())
            } else if let Some(v) = w.strip_prefix("vsock-cid:") {
                Rule::VsockCid(number(v)?)
            } else if let Some(v) = w.strip_prefix("vsock-port:") {
                Rule::VsockPort(number(v)?)
            } else {
                let (addr, bits) = match w.split_once('/') {
                    Some((a, b)) => (a, Some(b)),
                    None => (w, None),
                };
                let ip: IpAddr = match addr.parse() {
                    Ok(ip) => ip,
                    Err(_) if bits.is_some() || addr.contains(['.', ':']) => {
                        return Err(ConfigError::new(format!(
                            "cannot parse address \"{addr}\" from {key}={list}"
                        )))
                    }
                    Err(_) => return Err(bad()),
                };
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let bits = match bits {
                    None => max,
                    Some(b) => match b.trim().parse::<u8>() {
                        Ok(n) if n <= max => n,
                        _ => {
                            return Err(ConfigError::new(format!(
                                "cannot parse address \"{addr}\" from {key}={list}: the prefix length must be 0 to {max}"
                            )))
                        }
                    },
                };
                match ip {
                    IpAddr::V4(a) => Rule::Ipv4(a, bits),
                    IpAddr::V6(a) => Rule::Ipv6(a, bits),
                }
            }
        }
    })
}

fn parse_list(p: &mut Params, key: &str) -> ConfigResult<Vec<Rule>> {
    let mut rules = Vec::new();
    for list in p.take_all(key) {
        for word in list.split(',') {
            rules.push(parse_rule(key, &list, word)?);
        }
    }
    Ok(rules)
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let allow = parse_list(p, "allow")?;
    let deny = parse_list(p, "deny")?;
    Ok(Arc::new(IpFilter { allow, deny }))
}

struct IpFilter {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

fn prefix_match(a: u128, b: u128, bits: u8, width: u8) -> bool {
    if bits == 0 {
        return true;
    }
    let shift = width - bits;
    (a >> shift) == (b >> shift)
}

/// Does `rule` match a client at `peer` (None: a Unix socket or `-s`)
/// with Unix socket credentials `cred`?
fn matches(rule: &Rule, peer: Option<&SocketAddr>, cred: Option<&PeerCred>) -> bool {
    // An IPv4 client on an IPv6 socket shows as ::ffff:a.b.c.d.
    let ip = peer.map(|p| match p.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    });
    match (rule, ip) {
        (Rule::Any, _) => true,
        (Rule::AnyIpv4, Some(IpAddr::V4(_))) => true,
        (Rule::AnyIpv6, Some(IpAddr::V6(_))) => true,
        (Rule::AnyUnix, None) => true,
        (Rule::Ipv4(net, bits), Some(IpAddr::V4(a))) => {
            prefix_match(u32::from(*net) as u128, u32::from(a) as u128, *bits, 32)
        }
        (Rule::Ipv6(net, bits), Some(IpAddr::V6(a))) => {
            prefix_match(u128::from(*net), u128::from(a), *bits, 128)
        }
        (Rule::Pid(pid), None) => cred.is_some_and(|c| c.pid == *pid),
        (Rule::Uid(uid), None) => cred.is_some_and(|c| c.uid == *uid),
        (Rule::Gid(gid), None) => cred.is_some_and(|c| c.gid == *gid),
        (Rule::Security(label), None) => {
            cred.is_some_and(|c| c.security.as_deref() == Some(label.as_str()))
        }
        _ => false,
    }
}

/// The verdict for a client: Ok to let it in, else why not.
fn check(
    allow: &[Rule],
    deny: &[Rule],
    peer: Option<&SocketAddr>,
    cred: Option<&PeerCred>,
) -> Result<()> {
    if allow.iter().any(|r| matches(r, peer, cred)) {
        return Ok(());
    }
    if deny.iter().any(|r| matches(r, peer, cred)) {
        return Err(Error::eperm(
            "client not permitted to connect because of source address restriction",
        ));
    }
    Ok(())
}

#[async_trait]
impl Filter for IpFilter {
    fn passes_meta_contexts(&self) -> bool {
        // Same offsets and data: the plugin's other contexts stay true.
        true
    }
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        if let Err(e) = check(
            &self.allow,
            &self.deny,
            ctx.peer.as_ref(),
            ctx.cred.as_ref(),
        ) {
            libnbd::elog!("nbdkit: ip: {}", e.msg);
            return Err(e);
        }
        next.open(ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    fn rules(list: &str) -> ConfigResult<Vec<Rule>> {
        parse_list(&mut params(&[&format!("allow={list}")]), "allow")
    }

    fn tcp(s: &str) -> SocketAddr {
        SocketAddr::new(s.parse().unwrap(), 1234)
    }

    fn verdict(allow: &str, deny: &str, peer: Option<&str>) -> bool {
        let a = if allow.is_empty() {
            vec![]
        } else {
            rules(allow).unwrap()
        };
        let d = if deny.is_empty() {
            vec![]
        } else {
            rules(deny).unwrap()
        };
        check(&a, &d, peer.map(tcp).as_ref(), None).is_ok()
    }

    #[test]
    fn ip_rule_syntax() {
        assert_eq!(
            rules("all,any,anyipv4,allipv6,anyunix,allvsock").unwrap(),
            vec![
                Rule::Any,
                Rule::Any,
                Rule::AnyIpv4,
                Rule::AnyIpv6,
                Rule::AnyUnix,
                Rule::AnyVsock
            ]
        );
        assert_eq!(
            rules("127.0.0.1,10.0.0.0/8,::1,fe80::/10").unwrap(),
            vec![
                Rule::Ipv4(Ipv4Addr::LOCALHOST, 32),
                Rule::Ipv4(Ipv4Addr::new(10, 0, 0, 0), 8),
                Rule::Ipv6(Ipv6Addr::LOCALHOST, 128),
                Rule::Ipv6("fe80::".parse().unwrap(), 10),
            ]
        );
        assert_eq!(
            rules("pid:1,uid:1000,gid:0,vsock-cid:3,vsock-port:9").unwrap(),
            vec![
                Rule::Pid(1),
                Rule::Uid(1000),
                Rule::Gid(0),
                Rule::VsockCid(3),
                Rule::VsockPort(9)
            ]
        );
        for bad in ["foo", "1.2.3.4/33", "::1/129", "uid:x", "1.2.3", ""] {
            assert!(rules(bad).is_err(), "{bad}");
        }
        let mut p = params(&["allow=127.0.0.1", "deny=all", "allow=::1", "x=y"]);
        create(&mut p).unwrap();
        assert_eq!(p.items().len(), 1);
    }

    #[test]
    fn ip_rules_order() {
        assert!(verdict("127.0.0.1,::1", "all", Some("127.0.0.1")));
        assert!(verdict("127.0.0.1,::1", "all", Some("::1")));
        assert!(!verdict("127.0.0.1,::1", "all", Some("10.1.1.1")));
        assert!(!verdict("127.0.0.1,::1", "all", None));
        assert!(!verdict("", "8.0.0.0/8", Some("8.8.8.8")));
        assert!(verdict("", "8.0.0.0/8", Some("9.8.8.8")));
        assert!(verdict("anyipv6", "all", Some("2001:db8::1")));
        assert!(!verdict("anyipv6", "all", Some("192.0.2.1")));
        assert!(verdict("10.0.0.0/8", "all", Some("::ffff:10.2.3.4")));
        assert!(verdict("fe80::/10", "all", Some("fe80::1234")));
        assert!(!verdict("fe80::/10", "all", Some("fec0::1")));
        assert!(verdict("0.0.0.0/0", "all", Some("1.2.3.4")));
        assert!(verdict("anyunix", "all", None));
        assert!(!verdict("anyvsock,vsock-cid:2", "all", None));
        assert!(verdict("", "", Some("1.2.3.4")));
        assert!(verdict("", "anyipv6", None));
    }

    #[test]
    fn ip_credential_rules() {
        let cred = PeerCred {
            pid: 42,
            uid: 1000,
            gid: 100,
            security: Some("system_u:system_r:svirt_t:s0".into()),
        };
        let unix = |allow: &str, deny: &str, cred: Option<&PeerCred>| {
            let list = |l: &str| {
                if l.is_empty() {
                    vec![]
                } else {
                    rules(l).unwrap()
                }
            };
            check(&list(allow), &list(deny), None, cred).is_ok()
        };
        assert!(unix("uid:1000", "all", Some(&cred)));
        assert!(!unix("uid:0", "all", Some(&cred)));
        assert!(unix("gid:100", "all", Some(&cred)));
        assert!(unix("pid:42", "all", Some(&cred)));
        assert!(!unix("pid:43", "all", Some(&cred)));
        assert!(!unix("", "uid:1000", Some(&cred)));
        assert!(unix("", "uid:1001", Some(&cred)));
        assert!(unix(
            "security:system_u:system_r:svirt_t:s0",
            "all",
            Some(&cred)
        ));
        assert!(!unix("security:other", "all", Some(&cred)));
        // -s on a pipe has no credentials: nothing to match.
        assert!(!unix("uid:1000", "all", None));
        // TCP clients never match credential rules.
        assert!(!verdict("uid:0", "all", Some("127.0.0.1")));
        assert!(verdict("", "uid:0", Some("127.0.0.1")));
        assert!(rules("security:").is_err());
    }

    #[tokio::test]
    async fn ip_open_refuses_with_eperm() {
        let mem = Mem::new(512);
        let mut p = params(&["allow=127.0.0.1", "deny=all"]);
        let s = stack(vec![create(&mut p).unwrap()], &mem);
        let mut c = ctx(1);
        c.peer = Some(tcp("127.0.0.1"));
        s.open(&c).await.unwrap();
        c.peer = Some(tcp("127.0.0.2"));
        let e = s.open(&c).await.err().unwrap();
        assert_eq!(e.errno, libnbd::protocol::errno::EPERM);
        assert_eq!(mem.opens.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
