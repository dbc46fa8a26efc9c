//! `sluice-marked-connect ADDR MARK`: connects to ADDR from a socket whose
//! SO_MARK is MARK (set before connect, as an app with NET_ADMIN could),
//! sends one line, half-closes and prints what came back. Tests use it to
//! show that a mark gets no pod out of eBPF capture.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(mark)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: sluice-marked-connect ADDR MARK");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is ip:port");
    let mark = u32::from_str_radix(mark.trim_start_matches("0x"), 16).expect("MARK is hex");
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
    setsockopt(&fd, sockopt::Mark, &mark).expect("SO_MARK (needs CAP_NET_ADMIN)");
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(addr)).expect("connect");
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(b"marked hello\n").expect("write");
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut back = String::new();
    s.read_to_string(&mut back).expect("read");
    print!("{back}");
}
