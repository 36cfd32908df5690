//! Ports for the processes a test starts (nodes, sandboxes, a browser driver), which bind them
//! after the test has chosen them.
//!
//! A port bound to 0 comes from the kernel's ephemeral range, the same range every outgoing
//! connection takes its local port from: between the test releasing such a port and its node
//! binding it, another node's connection could take it, and the node then failed to start
//! ("Address already in use"). These ports are chosen below that range, where no connection
//! goes.

use std::net::TcpListener;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the tests' ports come from when the ephemeral range cannot be read.
const TEST_PORTS_DEFAULT: Range<u16> = TEST_PORTS_START..32_000;
/// Fewest ports below the ephemeral range worth choosing from; with fewer, the choice falls back
/// to [`TEST_PORTS_DEFAULT`].
const TEST_PORTS_MIN: u16 = 2_000;
/// The lowest port a test takes (below it are well-known and registered services).
const TEST_PORTS_START: u16 = 10_000;

/// Choices made by this process so far, so successive calls start at different places.
static CHOSEN: AtomicU32 = AtomicU32::new(0);

/// `n` consecutive ports on 127.0.0.1 that were free when chosen, outside the ephemeral range;
/// the first of them.
pub fn free_ports(n: u16) -> u16 {
    let range = test_ports();
    let span = u32::from(range.end - range.start - n);
    // Spread over the range by process and call, so two test processes rarely try the same.
    let seed = std::process::id().wrapping_mul(7919).wrapping_add(CHOSEN.fetch_add(1, Ordering::Relaxed) * 997);
    for step in 0..span {
        let first = range.start + ((seed.wrapping_add(step)) % span) as u16;
        let held: Vec<_> = (first..first + n).map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok()).collect();
        if held.len() == usize::from(n) {
            return first;
        }
    }
    panic!("no {n} consecutive free ports on 127.0.0.1 in {range:?}");
}

/// The ports below the kernel's ephemeral range (Linux: `ip_local_port_range`).
fn test_ports() -> Range<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok());
    match ephemeral_start {
        Some(start) if start >= TEST_PORTS_START + TEST_PORTS_MIN => TEST_PORTS_START..start,
        _ => TEST_PORTS_DEFAULT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chosen_ports_are_consecutive_free_and_below_the_ephemeral_range() {
        let range = test_ports();
        for n in [1, 3, 9] {
            let first = free_ports(n);
            assert!(range.contains(&first) && range.contains(&(first + n - 1)), "{first}+{n} outside {range:?}");
            let held: Vec<_> = (first..first + n).map(|p| TcpListener::bind(("127.0.0.1", p)).unwrap()).collect();
            assert_eq!(held.len(), usize::from(n));
        }
        // A connection's local port comes from the ephemeral range, never from these.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap().local_addr().unwrap().port();
        assert!(!range.contains(&local), "a connection took port {local}, inside {range:?}");
    }
}
