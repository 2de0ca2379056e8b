//! The cluster helper itself: it really starts a server that accepts connections.

use std::net::TcpStream;

#[test]
fn cluster_starts_accepts_connections_and_stops() {
    let pg = sitegate_testkit::PgCluster::start();
    assert!(TcpStream::connect(("127.0.0.1", pg.port)).is_ok());
    let url = pg.create_database();
    assert!(url.starts_with("postgres://postgres@127.0.0.1:"));
    pg.stop();
    assert!(TcpStream::connect(("127.0.0.1", pg.port)).is_err());
    pg.restart();
    assert!(TcpStream::connect(("127.0.0.1", pg.port)).is_ok());
}
