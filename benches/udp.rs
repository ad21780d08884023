//! The mesh's batched UDP I/O (`warden_agent::mesh::udp`: `sendmmsg` with
//! UDP GSO, `recvmmsg` with UDP GRO) against the `quinn-udp` crate's
//! `UdpSocketState` (one `sendmsg` per `Transmit`, GSO when `segment_size`
//! is set; `recvmmsg` with GRO), both on tokio sockets over loopback
//! (127.0.0.1), sender and receivers as tasks of one two-thread runtime.
//! The same workload each way: batches of [`BATCH`] datagrams of
//! [`DATAGRAM`] bytes, as fast as the sender can, for [`SECS`] seconds,
//! alternated a/b for [`ROUNDS`] rounds; first all to one peer (GSO runs),
//! then dealt in turn to [`PEERS`] peers (runs of one: ours still moves
//! up to 64 per `sendmmsg`, quinn-udp has one `sendmsg` each). Prints
//! datagrams/s and Gbit/s of payload sent and received. Run with
//! `cargo bench --bench udp`. Asserts nothing.

use std::{
    io::{self, IoSliceMut},
    net::SocketAddr,
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::{io::Interest, net::UdpSocket};
use warden_agent::mesh::udp::{RecvBatch, SendBatch, Socket, RECV_SLOT};

/// Payload bytes per datagram (a full-MTU WireGuard data packet).
const DATAGRAM: usize = 1420;
/// Datagrams per send call of the workload (the mesh's loops move up to
/// 128 per round).
const BATCH: usize = 128;
/// Most datagrams in one GSO message: 64 KiB less headers, in 1420s.
const GSO_RUN: usize = (65_535 - 40 - 8) / DATAGRAM;
/// Receive slots (as many as `RecvBatch` has), each room for a GRO run.
const SLOTS: usize = 16;
const SECS: u64 = 2;
const ROUNDS: usize = 5;
/// Peers of the second workload (runs of one datagram: no GSO).
const PEERS: usize = 4;
/// The socket buffers both ask for (as `mesh::udp::Socket::bind` does).
const SOCKET_BUFFER: libc::c_int = 7 << 20;

#[derive(Clone, Copy, Default)]
struct Tally {
    sent: u64,
    received: u64,
    recv_calls: u64,
    secs: f64,
}

/// Each receiver's (datagrams, recv calls).
type Receivers = Vec<tokio::task::JoinHandle<io::Result<(u64, u64)>>>;

impl Tally {
    /// What `sent` since `start` came to, once the receivers are done.
    async fn of(sent: u64, start: Instant, receivers: Receivers) -> io::Result<Tally> {
        let secs = start.elapsed().as_secs_f64();
        let (mut received, mut recv_calls) = (0, 0);
        for r in receivers {
            let (n, c) = r.await.unwrap()?;
            received += n;
            recv_calls += c;
        }
        Ok(Tally {
            sent,
            received,
            recv_calls,
            secs,
        })
    }

    fn print(&self, name: &str, round: usize) {
        let rate = |n: u64| n as f64 / self.secs;
        let gbit = |n: u64| rate(n) * (DATAGRAM * 8) as f64 / 1e9;
        println!(
            "round {round} {name:<9} sent {:>10.0} dgram/s {:>6.2} Gbit/s | received {:>10.0} dgram/s {:>6.2} Gbit/s ({:.1}% of sent, {:.1} dgram/recv call)",
            rate(self.sent),
            gbit(self.sent),
            rate(self.received),
            gbit(self.received),
            100.0 * self.received as f64 / self.sent.max(1) as f64,
            self.received as f64 / self.recv_calls.max(1) as f64,
        );
    }
}

/// (a) The mesh's own socket: `peers` receivers, the batch's datagrams
/// dealt to them in turn (one peer: one GSO run per 46 datagrams; more:
/// runs of one, many messages per `sendmmsg`).
async fn ours(peers: usize) -> io::Result<Tally> {
    let tx = Socket::bind(([127, 0, 0, 1], 0).into()).await?;
    let deadline = Instant::now() + Duration::from_secs(SECS);
    let start = Instant::now();
    let mut dests = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..peers {
        let rx = Socket::bind(([127, 0, 0, 1], 0).into()).await?;
        dests.push(rx.local_addr()?);
        receivers.push(tokio::spawn(async move {
            let mut batch = RecvBatch::new();
            let (mut received, mut calls) = (0u64, 0u64);
            let sleep = tokio::time::sleep_until(deadline.into());
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    r = rx.recv(&mut batch) => {
                        r?;
                        calls += 1;
                        received += batch.datagrams().filter(|(_, d)| d.len() == DATAGRAM).count() as u64;
                    }
                }
            }
            io::Result::Ok((received, calls))
        }));
    }
    let mut batch = SendBatch::new();
    for i in 0..BATCH {
        let d = batch.spare(DATAGRAM);
        d[..DATAGRAM].fill(i as u8);
        batch.commit(dests[i % peers], DATAGRAM);
    }
    let mut sent = 0u64;
    while Instant::now() < deadline {
        tx.send(&batch).await?;
        sent += BATCH as u64;
    }
    Tally::of(sent, start, receivers).await
}

/// A tokio socket set up for quinn-udp, with the buffers ours asks for.
async fn quinn_socket() -> io::Result<(UdpSocket, UdpSocketState)> {
    let sock = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let state = UdpSocketState::new((&sock).into())?;
    let fd = sock.as_raw_fd();
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt(fd, force, SOCKET_BUFFER).is_err() {
            let _ = setsockopt(fd, plain, SOCKET_BUFFER);
        }
    }
    Ok((sock, state))
}

fn setsockopt(fd: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: an int option, passed by pointer with its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// (b) quinn-udp, driven as its docs show: `try_io` on a tokio socket;
/// the same datagrams to the same peers, one `Transmit` (one `sendmsg`) per
/// run of consecutive datagrams to one peer.
async fn quinn(peers: usize) -> io::Result<Tally> {
    let (tx, tx_state) = quinn_socket().await?;
    let deadline = Instant::now() + Duration::from_secs(SECS);
    let start = Instant::now();
    let mut dests = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..peers {
        let (rx, rx_state) = quinn_socket().await?;
        dests.push(rx.local_addr()?);
        receivers.push(tokio::spawn(async move {
            let slot = RECV_SLOT.max(rx_state.gro_segments() * DATAGRAM);
            let mut buf = vec![0u8; slot * SLOTS];
            let mut meta = [RecvMeta::default(); SLOTS];
            let (mut received, mut calls) = (0u64, 0u64);
            let sleep = tokio::time::sleep_until(deadline.into());
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    r = rx.readable() => {
                        r?;
                        let mut iovs: Vec<IoSliceMut<'_>> =
                            buf.chunks_mut(slot).map(IoSliceMut::new).collect();
                        match rx.try_io(Interest::READABLE, || {
                            rx_state.recv((&rx).into(), &mut iovs, &mut meta)
                        }) {
                            Ok(n) => {
                                calls += 1;
                                for (m, iov) in meta[..n].iter().zip(&iovs) {
                                    received += iov[..m.len]
                                        .chunks(m.stride.max(1))
                                        .filter(|d| d.len() == DATAGRAM)
                                        .count() as u64;
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            Ok((received, calls))
        }));
    }
    let payload: Vec<u8> = (0..BATCH)
        .flat_map(|i| std::iter::repeat_n(i as u8, DATAGRAM))
        .collect();
    // As many datagrams per Transmit as the socket's GSO takes, when
    // consecutive datagrams go to one peer.
    let run = if peers == 1 {
        GSO_RUN.min(tx_state.max_gso_segments()).max(1)
    } else {
        1
    };
    let mut sent = 0u64;
    while Instant::now() < deadline {
        for (i, chunk) in payload.chunks(run * DATAGRAM).enumerate() {
            let transmit = Transmit {
                destination: dests[i % peers],
                ecn: None,
                contents: chunk,
                segment_size: (chunk.len() > DATAGRAM).then_some(DATAGRAM),
                src_ip: None,
            };
            loop {
                tx.writable().await?;
                match tx.try_io(Interest::WRITABLE, || {
                    tx_state.try_send((&tx).into(), &transmit)
                }) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        sent += BATCH as u64;
    }
    Tally::of(sent, start, receivers).await
}

fn main() -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let probe = Socket::bind(([127, 0, 0, 1], 0).into()).await?;
        let (qs, q) = quinn_socket().await?;
        println!(
            "{BATCH} datagrams of {DATAGRAM} bytes per send call, {SECS} s a run; \
             ours: gso {} gro {}; quinn-udp: max_gso_segments {} gro_segments {} may_fragment {}",
            probe.gso(),
            probe.gro(),
            q.max_gso_segments(),
            q.gro_segments(),
            q.may_fragment(),
        );
        drop((probe, qs));
        for peers in [1, PEERS] {
            println!("-- {peers} peer(s), datagrams dealt to them in turn");
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for round in 1..=ROUNDS {
                let t = ours(peers).await?;
                t.print("ours", round);
                a.push(t);
                let t = quinn(peers).await?;
                t.print("quinn-udp", round);
                b.push(t);
            }
            for (name, ts) in [("ours", &a), ("quinn-udp", &b)] {
                let mut r: Vec<f64> = ts.iter().map(|t| t.received as f64 / t.secs).collect();
                r.sort_by(f64::total_cmp);
                let median = r[r.len() / 2];
                println!(
                    "median    {name:<9} received {median:>10.0} dgram/s {:>6.2} Gbit/s",
                    median * (DATAGRAM * 8) as f64 / 1e9
                );
            }
        }
        io::Result::Ok(())
    })
}
