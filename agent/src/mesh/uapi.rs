//! The WireGuard cross-platform userspace API (UAPI), as text in and text
//! out: <https://www.wireguard.com/xplatform/>. Stock `wg show` / `wg set`
//! speak it over `/var/run/wireguard/IFNAME.sock`; the socket task (later)
//! only moves bytes, this module parses requests and renders answers.
//!
//! A request is `get=1\n\n`, or `set=1\n` followed by `key=value` lines and
//! an empty line. Interface keys (`private_key`, `listen_port`, `fwmark`,
//! `replace_peers`) come before the first `public_key`; every line after a
//! `public_key` line belongs to that peer until the next one.
//!
//! Every answer ends with `errno=N` and an empty line. wireguard-go writes
//! the *negated* errno after a failed set (`errno=-22`), and `wg set` relies
//! on that sign (it sets `errno = -N`, so `-22` prints "Invalid argument");
//! a failed parse here answers [`ERRNO_INVALID`] (= -EINVAL) like
//! wireguard-go does for every malformed value or unknown key.

use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Duration,
};

/// Largest request accepted, in bytes: a full mesh of a few thousand peers
/// fits; a client streaming garbage does not grow our memory.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Most lines accepted in one request (the `set=1` line and the empty line
/// included).
pub const MAX_REQUEST_LINES: usize = 10_000;
/// The errno a failed set answers for malformed input: -EINVAL, negated as
/// wireguard-go writes it and as `wg set` expects it.
pub const ERRNO_INVALID: i32 = -22;
/// -EIO, for the shell when the device failed to apply a valid request.
pub const ERRNO_IO: i32 = -5;
/// -EADDRINUSE, for the shell when `listen_port` cannot be bound.
pub const ERRNO_PORT_IN_USE: i32 = -98;

/// A 32-byte WireGuard key (private, public or preshared).
pub type Key = [u8; 32];

/// One parsed UAPI request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get=1`: dump the device.
    Get,
    /// `set=1`: apply these operations, in order.
    Set(Vec<Op>),
}

/// One operation of a set request, in the order the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `private_key=`; all zeros clears the key (as in wireguard-go).
    PrivateKey(Key),
    /// `listen_port=`; 0 lets the device pick.
    ListenPort(u16),
    /// `fwmark=`; 0 clears the mark.
    Fwmark(u32),
    /// `replace_peers=true`: remove every peer before what follows.
    ReplacePeers,
    /// A `public_key=` line and the peer lines after it.
    Peer(PeerOp),
}

/// What a set request says about one peer. The lines of a peer block are
/// folded into this struct, so their order inside the block is not kept:
/// `remove` wins over everything else, `update_only` means "skip the block
/// if the peer is unknown" wherever it appeared, and `replace_allowed_ips`
/// applies before the block's `allowed_ip` lines (the order `wg` sends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOp {
    /// `public_key=`: which peer.
    pub public_key: Key,
    /// `remove=true`.
    pub remove: bool,
    /// `update_only=true`: do not create the peer if it is unknown.
    pub update_only: bool,
    /// `preshared_key=`; `Some([0; 32])` clears it.
    pub preshared_key: Option<Key>,
    /// `endpoint=IP:PORT` (`[v6]:PORT`).
    pub endpoint: Option<SocketAddr>,
    /// `persistent_keepalive_interval=` in seconds; `Some(0)` turns it off.
    pub keepalive: Option<u16>,
    /// `replace_allowed_ips=true`: clear the peer's list before adding.
    pub replace_allowed_ips: bool,
    /// `allowed_ip=` lines, in order.
    pub allowed_ips: Vec<IpNet>,
}

impl PeerOp {
    /// A block that names the peer and changes nothing (wireguard-go would
    /// create the peer with defaults).
    pub fn new(public_key: Key) -> PeerOp {
        PeerOp {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// An IP prefix, `ADDR/CIDR` (the `ipnet` crate's). [`parse_net`] keeps
/// the address as given (host bits included, as `wg set` may send
/// `10.0.0.1/24`); `IpNet::trunc` masks them, and everything that compares
/// prefixes (the peer table, the config checks) compares masked networks,
/// as WireGuard itself does.
pub use ipnet::IpNet;

/// Why a prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetError {
    /// No `/` in the text.
    #[error("expected ADDR/CIDR, found no '/'")]
    NoSlash,
    /// The part before `/` is not an IP address.
    #[error("{0:?} is not an IP address")]
    BadAddr(String),
    /// The part after `/` is not a decimal number.
    #[error("prefix length {0:?} is not a decimal number")]
    BadPrefix(String),
    /// Longer than the address.
    #[error("prefix length {prefix} is longer than {max} for {addr}")]
    PrefixTooLong {
        /// The address.
        addr: IpAddr,
        /// The length asked for.
        prefix: u8,
        /// 32 or 128.
        max: u8,
    },
}

/// A prefix, refusing lengths beyond the address family's (`ipnet`'s own
/// error does not say which family, nor its limit).
pub fn new_net(addr: IpAddr, prefix: u8) -> Result<IpNet, IpNetError> {
    IpNet::new(addr, prefix).map_err(|ipnet::PrefixLenError| IpNetError::PrefixTooLong {
        addr,
        prefix,
        max: match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        },
    })
}

/// `ADDR/CIDR` as UAPI sends it: the address kept as given, the length in
/// ASCII digits only (Go's parse refuses a leading `+`, which `ipnet`'s
/// `FromStr` would not name), errors saying which part was wrong.
pub fn parse_net(s: &str) -> Result<IpNet, IpNetError> {
    let (addr, prefix) = s.split_once('/').ok_or(IpNetError::NoSlash)?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| IpNetError::BadAddr(clip(addr).to_string()))?;
    let prefix = parse_decimal::<u8>(prefix)
        .ok_or_else(|| IpNetError::BadPrefix(clip(prefix).to_string()))?;
    new_net(addr, prefix)
}

/// Whether the two prefixes share any address (one contains the other;
/// never across families).
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// Why a request was refused. Messages name the line (1 is the `set=1`
/// line) and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    /// Over [`MAX_REQUEST_BYTES`].
    #[error("request of {size} bytes is over the limit of {MAX_REQUEST_BYTES} bytes")]
    TooLarge {
        /// Bytes received.
        size: usize,
    },
    /// Over [`MAX_REQUEST_LINES`].
    #[error("request has more than {MAX_REQUEST_LINES} lines")]
    TooManyLines,
    /// No empty line ends the request.
    #[error("request does not end with an empty line")]
    Unterminated,
    /// Bytes after the empty line that ends the request.
    #[error("line {line}: data after the empty line that ends the request")]
    TrailingData {
        /// The first line after the end.
        line: usize,
    },
    /// The first line is neither `get=1` nor `set=1`.
    #[error("line 1: unknown operation {op:?}; expected \"get=1\" or \"set=1\"")]
    UnknownOperation {
        /// The first line.
        op: String,
    },
    /// A get request with lines after `get=1`.
    #[error("line {line}: a get request takes no keys, found {text:?}")]
    GetWithKeys {
        /// Line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A line without `=`.
    #[error("line {line}: {text:?} is not key=value")]
    NotKeyValue {
        /// Line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A key this protocol does not have (wireguard-go refuses them too).
    #[error("line {line}: unknown key {key:?}")]
    UnknownKey {
        /// Line number.
        line: usize,
        /// The key.
        key: String,
    },
    /// An interface key after a `public_key` line.
    #[error("line {line}: interface key {key} must come before the first public_key")]
    InterfaceKeyInPeer {
        /// Line number.
        line: usize,
        /// The key.
        key: String,
    },
    /// A peer key before any `public_key` line.
    #[error("line {line}: peer key {key} comes before any public_key")]
    PeerKeyBeforePublicKey {
        /// Line number.
        line: usize,
        /// The key.
        key: String,
    },
    /// A known key with a value it cannot take.
    #[error("line {line}: {key}={value:?}: {reason}")]
    InvalidValue {
        /// Line number.
        line: usize,
        /// The key.
        key: String,
        /// The value (clipped to 80 characters).
        value: String,
        /// What was expected.
        reason: String,
    },
}

impl UapiError {
    /// The errno to answer with: [`ERRNO_INVALID`] for every parse failure.
    pub fn errno(&self) -> i32 {
        ERRNO_INVALID
    }
}

/// Clip text quoted in an error, so a huge line makes a short message.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A decimal number made of ASCII digits only (Rust's parse would take a
/// leading `+`, Go's does not).
fn parse_decimal<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_key(s: &str) -> Result<Key, String> {
    if s.len() != 64 {
        return Err(format!(
            "a key is 64 hex characters (32 bytes), found {} characters",
            s.len()
        ));
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(s, &mut key).map_err(|e| format!("not hex: {e}"))?;
    Ok(key)
}

fn parse_true(s: &str) -> Result<(), String> {
    if s == "true" {
        Ok(())
    } else {
        Err("the only value allowed is \"true\"".to_string())
    }
}

/// Parse one request: `text` is everything up to and including the empty
/// line that ends it. Refuses oversized input before looking at it.
pub fn parse_request(text: &str) -> Result<Request, UapiError> {
    if text.len() > MAX_REQUEST_BYTES {
        return Err(UapiError::TooLarge { size: text.len() });
    }
    let body = text.strip_suffix("\n\n").ok_or(UapiError::Unterminated)?;
    // `body` now holds the lines before the empty one; an empty line inside
    // it means the request ended earlier and more data followed.
    let mut lines = body.split('\n').enumerate().map(|(i, l)| (i + 1, l));
    let (_, op) = lines.next().ok_or(UapiError::Unterminated)?;
    let is_get = match op {
        "get=1" => true,
        "set=1" => false,
        other => {
            return Err(UapiError::UnknownOperation {
                op: clip(other).to_string(),
            })
        }
    };
    let mut ops = Vec::new();
    let mut peer: Option<PeerOp> = None;
    for (n, line) in lines {
        // +1: the terminating empty line counts too.
        if n + 1 > MAX_REQUEST_LINES {
            return Err(UapiError::TooManyLines);
        }
        if line.is_empty() {
            return Err(UapiError::TrailingData { line: n + 1 });
        }
        if is_get {
            return Err(UapiError::GetWithKeys {
                line: n,
                text: clip(line).to_string(),
            });
        }
        let (key, value) = line.split_once('=').ok_or_else(|| UapiError::NotKeyValue {
            line: n,
            text: clip(line).to_string(),
        })?;
        let invalid = |reason: String| UapiError::InvalidValue {
            line: n,
            key: clip(key).to_string(),
            value: clip(value).to_string(),
            reason,
        };
        match key {
            "private_key" | "listen_port" | "fwmark" | "replace_peers" => {
                if peer.is_some() {
                    return Err(UapiError::InterfaceKeyInPeer {
                        line: n,
                        key: key.to_string(),
                    });
                }
                let op = match key {
                    "private_key" => Op::PrivateKey(parse_key(value).map_err(invalid)?),
                    "listen_port" => Op::ListenPort(
                        parse_decimal(value)
                            .ok_or_else(|| invalid("expected a port, 0 to 65535".into()))?,
                    ),
                    "fwmark" => Op::Fwmark(
                        parse_decimal(value)
                            .ok_or_else(|| invalid("expected a number, 0 to 4294967295".into()))?,
                    ),
                    _ => {
                        parse_true(value).map_err(invalid)?;
                        Op::ReplacePeers
                    }
                };
                ops.push(op);
            }
            "public_key" => {
                let key = parse_key(value).map_err(invalid)?;
                if let Some(done) = peer.replace(PeerOp::new(key)) {
                    ops.push(Op::Peer(done));
                }
            }
            "remove"
            | "update_only"
            | "preshared_key"
            | "endpoint"
            | "persistent_keepalive_interval"
            | "replace_allowed_ips"
            | "allowed_ip"
            | "protocol_version" => {
                let Some(p) = peer.as_mut() else {
                    return Err(UapiError::PeerKeyBeforePublicKey {
                        line: n,
                        key: key.to_string(),
                    });
                };
                match key {
                    "remove" => {
                        parse_true(value).map_err(invalid)?;
                        p.remove = true;
                    }
                    "update_only" => {
                        parse_true(value).map_err(invalid)?;
                        p.update_only = true;
                    }
                    "replace_allowed_ips" => {
                        parse_true(value).map_err(invalid)?;
                        p.replace_allowed_ips = true;
                    }
                    "preshared_key" => p.preshared_key = Some(parse_key(value).map_err(invalid)?),
                    "endpoint" => {
                        p.endpoint = Some(value.parse().map_err(|_| {
                            invalid("expected IP:PORT, with an IPv6 address as [ADDR]:PORT".into())
                        })?)
                    }
                    "persistent_keepalive_interval" => {
                        p.keepalive = Some(
                            parse_decimal(value)
                                .ok_or_else(|| invalid("expected seconds, 0 to 65535".into()))?,
                        )
                    }
                    "allowed_ip" => p
                        .allowed_ips
                        .push(parse_net(value).map_err(|e| invalid(e.to_string()))?),
                    _ => {
                        if value != "1" {
                            return Err(invalid("only protocol version 1 exists".into()));
                        }
                    }
                }
            }
            _ => {
                return Err(UapiError::UnknownKey {
                    line: n,
                    key: clip(key).to_string(),
                })
            }
        }
    }
    if let Some(done) = peer {
        ops.push(Op::Peer(done));
    }
    Ok(if is_get {
        Request::Get
    } else {
        Request::Set(ops)
    })
}

/// The device as a get answer shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceView {
    /// `None` (or all zeros) is left out of the answer.
    pub private_key: Option<Key>,
    /// The bound port.
    pub listen_port: u16,
    /// 0 is left out of the answer.
    pub fwmark: u32,
    /// Peers, in the order to list them.
    pub peers: Vec<PeerView>,
}

/// One peer as a get answer shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// Its public key.
    pub public_key: Key,
    /// Left out when `None`.
    pub preshared_key: Option<Key>,
    /// Left out when not known.
    pub endpoint: Option<SocketAddr>,
    /// Seconds; 0 is off.
    pub keepalive: u16,
    /// Its allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Time of the last handshake since the Unix epoch; `None` shows as 0.
    pub last_handshake: Option<Duration>,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

/// The answer to a get: the device, then `errno=0` and the empty line.
pub fn render_get(d: &DeviceView) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    // Writing to a String cannot fail.
    if let Some(k) = d.private_key.filter(|k| *k != [0; 32]) {
        let _ = writeln!(s, "private_key={}", hex::encode(k));
    }
    let _ = writeln!(s, "listen_port={}", d.listen_port);
    if d.fwmark != 0 {
        let _ = writeln!(s, "fwmark={}", d.fwmark);
    }
    for p in &d.peers {
        let _ = writeln!(s, "public_key={}", hex::encode(p.public_key));
        if let Some(k) = p.preshared_key.filter(|k| *k != [0; 32]) {
            let _ = writeln!(s, "preshared_key={}", hex::encode(k));
        }
        if let Some(ep) = p.endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let _ = writeln!(s, "persistent_keepalive_interval={}", p.keepalive);
        for ip in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={ip}");
        }
        let hs = p.last_handshake.unwrap_or_default();
        let _ = writeln!(s, "last_handshake_time_sec={}", hs.as_secs());
        let _ = writeln!(s, "last_handshake_time_nsec={}", hs.subsec_nanos());
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        s.push_str("protocol_version=1\n");
    }
    s.push_str(&render_errno(0));
    s
}

/// The status line that ends every answer: `errno=N` and the empty line.
/// Pass 0 for success and a negated errno (e.g. [`ERRNO_INVALID`]) for a
/// failed set, as wireguard-go does.
pub fn render_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

/// A set request for `ops`, as a client (or a test) writes it; parsing the
/// result gives `ops` back.
pub fn render_set(ops: &[Op]) -> String {
    use std::fmt::Write;
    let mut s = String::from("set=1\n");
    for op in ops {
        let _ = match op {
            Op::PrivateKey(k) => writeln!(s, "private_key={}", hex::encode(k)),
            Op::ListenPort(p) => writeln!(s, "listen_port={p}"),
            Op::Fwmark(m) => writeln!(s, "fwmark={m}"),
            Op::ReplacePeers => writeln!(s, "replace_peers=true"),
            Op::Peer(p) => {
                let _ = writeln!(s, "public_key={}", hex::encode(p.public_key));
                if p.remove {
                    let _ = writeln!(s, "remove=true");
                }
                if p.update_only {
                    let _ = writeln!(s, "update_only=true");
                }
                if let Some(k) = p.preshared_key {
                    let _ = writeln!(s, "preshared_key={}", hex::encode(k));
                }
                if let Some(ep) = p.endpoint {
                    let _ = writeln!(s, "endpoint={ep}");
                }
                if let Some(k) = p.keepalive {
                    let _ = writeln!(s, "persistent_keepalive_interval={k}");
                }
                if p.replace_allowed_ips {
                    let _ = writeln!(s, "replace_allowed_ips=true");
                }
                for ip in &p.allowed_ips {
                    let _ = writeln!(s, "allowed_ip={ip}");
                }
                Ok(())
            }
        };
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const A: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const B: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";
    const C: &str = "188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52";

    fn key(h: &str) -> Key {
        parse_key(h).unwrap()
    }

    fn net(s: &str) -> IpNet {
        parse_net(s).unwrap()
    }

    fn set(ops: &[Op]) -> Request {
        Request::Set(ops.to_vec())
    }

    #[test]
    fn get_parses() {
        assert_eq!(parse_request("get=1\n\n"), Ok(Request::Get));
    }

    #[test]
    fn get_with_keys_is_refused() {
        assert!(matches!(
            parse_request("get=1\nlisten_port=1\n\n"),
            Err(UapiError::GetWithKeys { line: 2, .. })
        ));
    }

    #[test]
    fn unknown_operation_is_refused() {
        assert!(matches!(
            parse_request("put=1\n\n"),
            Err(UapiError::UnknownOperation { .. })
        ));
        assert!(matches!(
            parse_request("get=2\n\n"),
            Err(UapiError::UnknownOperation { .. })
        ));
    }

    #[test]
    fn every_key_parses() {
        let text = format!(
            "set=1\nprivate_key={A}\nlisten_port=51820\nfwmark=7\nreplace_peers=true\n\
             public_key={B}\nupdate_only=true\npreshared_key={C}\nendpoint=192.0.2.1:51820\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=10.0.0.0/24\nallowed_ip=fd00::1/128\nprotocol_version=1\n\
             public_key={C}\nremove=true\n\n"
        );
        let mut b = PeerOp::new(key(B));
        b.update_only = true;
        b.preshared_key = Some(key(C));
        b.endpoint = Some("192.0.2.1:51820".parse().unwrap());
        b.keepalive = Some(25);
        b.replace_allowed_ips = true;
        b.allowed_ips = vec![net("10.0.0.0/24"), net("fd00::1/128")];
        let mut c = PeerOp::new(key(C));
        c.remove = true;
        assert_eq!(
            parse_request(&text),
            Ok(set(&[
                Op::PrivateKey(key(A)),
                Op::ListenPort(51820),
                Op::Fwmark(7),
                Op::ReplacePeers,
                Op::Peer(b),
                Op::Peer(c),
            ]))
        );
    }

    #[test]
    fn empty_set_parses() {
        assert_eq!(parse_request("set=1\n\n"), Ok(set(&[])));
    }

    #[test]
    fn uppercase_hex_is_accepted() {
        let text = format!("set=1\nprivate_key={}\n\n", A.to_uppercase());
        assert_eq!(parse_request(&text), Ok(set(&[Op::PrivateKey(key(A))])));
    }

    #[test]
    fn set_round_trips() {
        let mut p = PeerOp::new(key(B));
        p.preshared_key = Some([0; 32]);
        p.endpoint = Some("[::1]:51820".parse().unwrap());
        p.keepalive = Some(0);
        p.replace_allowed_ips = true;
        p.allowed_ips = vec![net("0.0.0.0/0"), net("::/0"), net("10.1.2.3/24")];
        let ops = vec![
            Op::PrivateKey(key(A)),
            Op::ListenPort(0),
            Op::Fwmark(u32::MAX),
            Op::ReplacePeers,
            Op::Peer(p),
            Op::Peer(PeerOp::new(key(C))),
        ];
        assert_eq!(parse_request(&render_set(&ops)), Ok(Request::Set(ops)));
    }

    #[test]
    fn ipv6_endpoint_parses() {
        let text = format!("set=1\npublic_key={B}\nendpoint=[::1]:51820\n\n");
        let Ok(Request::Set(ops)) = parse_request(&text) else {
            panic!("refused")
        };
        let Op::Peer(p) = &ops[0] else {
            panic!("not a peer")
        };
        assert_eq!(p.endpoint, Some("[::1]:51820".parse().unwrap()));
        // Without brackets the port cannot be told from the address.
        let text = format!("set=1\npublic_key={B}\nendpoint=::1:51820\n\n");
        assert!(matches!(
            parse_request(&text),
            Err(UapiError::InvalidValue { line: 3, ref key, .. }) if key == "endpoint"
        ));
    }

    fn invalid_key(text: &str) -> (usize, String) {
        match parse_request(text) {
            Err(UapiError::InvalidValue { line, key, .. }) => (line, key),
            other => panic!("expected InvalidValue for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn malformed_values_name_line_and_key() {
        let short = &A[..62];
        let cases = [
            (format!("set=1\nprivate_key={short}\n\n"), 2, "private_key"),
            (format!("set=1\nprivate_key={A}00\n\n"), 2, "private_key"),
            (
                format!("set=1\nprivate_key={}zz\n\n", &A[..62]),
                2,
                "private_key",
            ),
            (format!("set=1\npublic_key={short}\n\n"), 2, "public_key"),
            ("set=1\nlisten_port=65536\n\n".into(), 2, "listen_port"),
            ("set=1\nlisten_port=-1\n\n".into(), 2, "listen_port"),
            ("set=1\nlisten_port=+1\n\n".into(), 2, "listen_port"),
            ("set=1\nlisten_port=\n\n".into(), 2, "listen_port"),
            ("set=1\nfwmark=4294967296\n\n".into(), 2, "fwmark"),
            ("set=1\nreplace_peers=false\n\n".into(), 2, "replace_peers"),
            (
                format!("set=1\npublic_key={B}\npreshared_key=00\n\n"),
                3,
                "preshared_key",
            ),
            (
                format!("set=1\npublic_key={B}\nendpoint=192.0.2.1\n\n"),
                3,
                "endpoint",
            ),
            (
                format!("set=1\npublic_key={B}\nendpoint=host.example:51820\n\n"),
                3,
                "endpoint",
            ),
            (
                format!("set=1\npublic_key={B}\npersistent_keepalive_interval=70000\n\n"),
                3,
                "persistent_keepalive_interval",
            ),
            (
                format!("set=1\npublic_key={B}\nallowed_ip=10.0.0.0/33\n\n"),
                3,
                "allowed_ip",
            ),
            (
                format!("set=1\npublic_key={B}\nallowed_ip=fd00::/129\n\n"),
                3,
                "allowed_ip",
            ),
            (
                format!("set=1\npublic_key={B}\nallowed_ip=10.0.0.0\n\n"),
                3,
                "allowed_ip",
            ),
            (
                format!("set=1\npublic_key={B}\nallowed_ip=10.0.0/8\n\n"),
                3,
                "allowed_ip",
            ),
            (
                format!("set=1\npublic_key={B}\nallowed_ip=10.0.0.0/x\n\n"),
                3,
                "allowed_ip",
            ),
            (format!("set=1\npublic_key={B}\nremove=1\n\n"), 3, "remove"),
            (
                format!("set=1\npublic_key={B}\nupdate_only=yes\n\n"),
                3,
                "update_only",
            ),
            (
                format!("set=1\npublic_key={B}\nreplace_allowed_ips=\n\n"),
                3,
                "replace_allowed_ips",
            ),
            (
                format!("set=1\npublic_key={B}\nprotocol_version=2\n\n"),
                3,
                "protocol_version",
            ),
        ];
        for (text, line, k) in cases {
            assert_eq!(invalid_key(&text), (line, k.to_string()), "{text:?}");
        }
    }

    #[test]
    fn error_messages_name_what_was_wrong() {
        let e = parse_request("set=1\nlisten_port=99999\n\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: listen_port=\"99999\": expected a port, 0 to 65535"
        );
        assert_eq!(e.errno(), ERRNO_INVALID);
        let e = parse_request(&format!("set=1\nprivate_key={}\n\n", &A[..10])).unwrap_err();
        assert!(e.to_string().contains("64 hex characters"), "{e}");
    }

    #[test]
    fn interface_keys_after_a_peer_are_refused() {
        for k in [
            "private_key=".to_string() + A,
            "listen_port=1".into(),
            "fwmark=1".into(),
            "replace_peers=true".into(),
        ] {
            let text = format!("set=1\npublic_key={B}\n{k}\n\n");
            assert!(
                matches!(
                    parse_request(&text),
                    Err(UapiError::InterfaceKeyInPeer { line: 3, .. })
                ),
                "{text:?}"
            );
        }
    }

    #[test]
    fn peer_keys_before_any_public_key_are_refused() {
        for k in [
            "remove=true",
            "update_only=true",
            "endpoint=192.0.2.1:1",
            "persistent_keepalive_interval=1",
            "replace_allowed_ips=true",
            "allowed_ip=10.0.0.0/8",
            "protocol_version=1",
        ] {
            let text = format!("set=1\nlisten_port=1\n{k}\n\n");
            match parse_request(&text) {
                Err(UapiError::PeerKeyBeforePublicKey { line: 3, key }) => {
                    assert_eq!(Some(key.as_str()), k.split('=').next())
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse_request("set=1\nlisten_port=1\nmtu=1420\n\n").unwrap_err();
        assert_eq!(
            e,
            UapiError::UnknownKey {
                line: 3,
                key: "mtu".into()
            }
        );
        assert_eq!(e.to_string(), "line 3: unknown key \"mtu\"");
        // Keys are lowercase.
        assert!(matches!(
            parse_request("set=1\nLISTEN_PORT=1\n\n"),
            Err(UapiError::UnknownKey { .. })
        ));
    }

    #[test]
    fn line_without_equals_is_refused() {
        assert!(matches!(
            parse_request("set=1\nlisten_port\n\n"),
            Err(UapiError::NotKeyValue { line: 2, .. })
        ));
    }

    #[test]
    fn framing_is_checked() {
        assert_eq!(parse_request(""), Err(UapiError::Unterminated));
        assert_eq!(
            parse_request("\n\n"),
            Err(UapiError::UnknownOperation { op: String::new() })
        );
        assert_eq!(parse_request("get=1\n"), Err(UapiError::Unterminated));
        assert_eq!(
            parse_request("set=1\nfwmark=1\n"),
            Err(UapiError::Unterminated)
        );
        assert_eq!(
            parse_request("set=1\n\nfwmark=1\n\n"),
            Err(UapiError::TrailingData { line: 3 })
        );
        // A CR is part of the value, and no value takes one.
        assert!(parse_request("set=1\r\nfwmark=1\r\n\n").is_err());
    }

    #[test]
    fn limits_are_enforced() {
        let big = format!("set=1\n{}\n\n", "x".repeat(MAX_REQUEST_BYTES));
        assert_eq!(
            parse_request(&big),
            Err(UapiError::TooLarge { size: big.len() })
        );
        let mut many = String::from("set=1\n");
        for _ in 0..MAX_REQUEST_LINES {
            many.push_str("fwmark=1\n");
        }
        many.push('\n');
        assert!(many.len() < MAX_REQUEST_BYTES);
        assert_eq!(parse_request(&many), Err(UapiError::TooManyLines));
        // Exactly at the limit is fine: set=1, 9,998 keys, the empty line.
        let mut at = String::from("set=1\n");
        for _ in 0..MAX_REQUEST_LINES - 2 {
            at.push_str("fwmark=1\n");
        }
        at.push('\n');
        assert!(parse_request(&at).is_ok());
    }

    #[test]
    fn ipnet_parses_displays_and_masks() {
        let n = net("10.1.2.3/24");
        assert_eq!(n.to_string(), "10.1.2.3/24");
        assert_eq!(n.trunc(), net("10.1.2.0/24"));
        assert_eq!(net("fd00::1:2/112").trunc().to_string(), "fd00::1:0/112");
        assert_eq!(net("fd00::1:2/96").trunc().to_string(), "fd00::/96");
        assert_eq!(net("10.0.0.1/0").trunc(), net("0.0.0.0/0"));
        assert_eq!(net("10.0.0.1/32").trunc(), net("10.0.0.1/32"));
        assert!(matches!(
            parse_net("10.0.0.0/33"),
            Err(IpNetError::PrefixTooLong { max: 32, .. })
        ));
        assert!(matches!(
            parse_net("::/129"),
            Err(IpNetError::PrefixTooLong { max: 128, .. })
        ));
        assert!(parse_net("::/128").is_ok());
        assert_eq!(parse_net("10.0.0.0"), Err(IpNetError::NoSlash));
        assert!(matches!(
            parse_net("10.0.0.0/+8"),
            Err(IpNetError::BadPrefix(_))
        ));
        assert!(net("10.0.0.0/8").contains(&"10.255.0.1".parse::<IpAddr>().unwrap()));
        assert!(!net("10.0.0.0/8").contains(&"11.0.0.1".parse::<IpAddr>().unwrap()));
        assert!(!net("0.0.0.0/0").contains(&"::1".parse::<IpAddr>().unwrap()));
        assert!(overlaps(&net("10.0.0.0/8"), &net("10.9.0.0/16")));
        assert!(overlaps(&net("10.9.0.0/16"), &net("10.0.0.0/8")));
        assert!(!overlaps(&net("10.9.0.0/16"), &net("10.8.0.0/16")));
    }

    fn sample_device() -> DeviceView {
        DeviceView {
            private_key: Some(key(A)),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![
                PeerView {
                    public_key: key(B),
                    preshared_key: Some(key(C)),
                    endpoint: Some("[fd00::2]:51821".parse().unwrap()),
                    keepalive: 25,
                    allowed_ips: vec![net("10.0.0.2/32"), net("fd00::2/128")],
                    last_handshake: Some(Duration::new(1_700_000_000, 5)),
                    rx_bytes: 10,
                    tx_bytes: 20,
                },
                PeerView {
                    public_key: key(C),
                    preshared_key: None,
                    endpoint: None,
                    keepalive: 0,
                    allowed_ips: vec![],
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                },
            ],
        }
    }

    #[test]
    fn render_get_lists_everything_in_order() {
        let expected = format!(
            "private_key={A}\nlisten_port=51820\n\
             public_key={B}\npreshared_key={C}\nendpoint=[fd00::2]:51821\n\
             persistent_keepalive_interval=25\nallowed_ip=10.0.0.2/32\nallowed_ip=fd00::2/128\n\
             last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\n\
             rx_bytes=10\ntx_bytes=20\nprotocol_version=1\n\
             public_key={C}\npersistent_keepalive_interval=0\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
             rx_bytes=0\ntx_bytes=0\nprotocol_version=1\n\
             errno=0\n\n"
        );
        assert_eq!(render_get(&sample_device()), expected);
    }

    #[test]
    fn render_get_leaves_out_unset_values() {
        let d = DeviceView {
            private_key: None,
            listen_port: 0,
            fwmark: 3,
            peers: vec![],
        };
        assert_eq!(render_get(&d), "listen_port=0\nfwmark=3\nerrno=0\n\n");
        let d = DeviceView {
            private_key: Some([0; 32]),
            ..DeviceView::default()
        };
        assert_eq!(render_get(&d), "listen_port=0\nerrno=0\n\n");
    }

    #[test]
    fn render_errno_ends_the_answer() {
        assert_eq!(render_errno(0), "errno=0\n\n");
        assert_eq!(render_errno(ERRNO_INVALID), "errno=-22\n\n");
    }

    /// The interface lines of a get answer are set lines too; a set request
    /// built from them parses back to the same values.
    #[test]
    fn get_answer_interface_lines_feed_a_set() {
        let get = render_get(&sample_device());
        let iface: String = get
            .lines()
            .take_while(|l| !l.starts_with("public_key="))
            .map(|l| format!("{l}\n"))
            .collect();
        let req = parse_request(&format!("set=1\n{iface}\n")).unwrap();
        assert_eq!(req, set(&[Op::PrivateKey(key(A)), Op::ListenPort(51820)]));
    }

    fn arb_key() -> impl Strategy<Value = Key> {
        any::<[u8; 32]>()
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32)
                .prop_map(|(a, p)| new_net(IpAddr::V4(Ipv4Addr::from(a)), p).unwrap()),
            (any::<u128>(), 0u8..=128)
                .prop_map(|(a, p)| new_net(IpAddr::V6(Ipv6Addr::from(a)), p).unwrap()),
        ]
    }

    fn arb_endpoint() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<u32>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p)),
            (any::<u128>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), p)),
        ]
    }

    fn arb_peer_op() -> impl Strategy<Value = PeerOp> {
        (
            arb_key(),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(arb_key()),
            proptest::option::of(arb_endpoint()),
            proptest::option::of(any::<u16>()),
            any::<bool>(),
            proptest::collection::vec(arb_net(), 0..4),
        )
            .prop_map(|(k, remove, update_only, psk, ep, ka, rai, ips)| PeerOp {
                public_key: k,
                remove,
                update_only,
                preshared_key: psk,
                endpoint: ep,
                keepalive: ka,
                replace_allowed_ips: rai,
                allowed_ips: ips,
            })
    }

    fn arb_ops() -> impl Strategy<Value = Vec<Op>> {
        let iface = proptest::collection::vec(
            prop_oneof![
                arb_key().prop_map(Op::PrivateKey),
                any::<u16>().prop_map(Op::ListenPort),
                any::<u32>().prop_map(Op::Fwmark),
                Just(Op::ReplacePeers),
            ],
            0..4,
        );
        let peers = proptest::collection::vec(arb_peer_op().prop_map(Op::Peer), 0..4);
        (iface, peers).prop_map(|(mut i, p)| {
            i.extend(p);
            i
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn parse_never_panics(text in "\\PC*") {
            let _ = parse_request(&text);
        }

        #[test]
        fn parse_never_panics_on_near_requests(
            body in proptest::collection::vec(
                prop_oneof![
                    "[a-z_]{1,30}=[ -~]{0,70}",
                    "(public_key|private_key|preshared_key)=[0-9a-fA-F]{60,66}",
                    "(allowed_ip|endpoint)=[0-9a-f:.\\[\\]/%]{0,45}",
                    "[ -~]{0,20}",
                ],
                0..12,
            ),
            head in prop_oneof![Just("set=1".to_string()), Just("get=1".to_string()), "[ -~]{0,6}"],
            end in prop_oneof![Just("\n\n"), Just("\n"), Just("")],
        ) {
            let text = format!("{head}\n{}{end}", body.join("\n"));
            let _ = parse_request(&text);
        }

        #[test]
        fn set_round_trips_any_ops(ops in arb_ops()) {
            prop_assert_eq!(parse_request(&render_set(&ops)), Ok(Request::Set(ops)));
        }

        #[test]
        fn ipnet_round_trips(n in arb_net()) {
            prop_assert_eq!(parse_net(&n.to_string()), Ok(n));
            prop_assert!(n.contains(&n.addr()));
            prop_assert_eq!(n.trunc().trunc(), n.trunc());
        }
    }
}
