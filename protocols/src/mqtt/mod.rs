//! MQTT packets and the server-side session state machine.

mod ack;
mod codec;
mod connack;
mod connect;
mod header;
mod publish;
pub mod session;
mod subscribe;
mod unsubscribe;

pub use codec::{decode, encode, encoded_len, DecodeError, Packet};
pub use connack::{ConnAck, ConnectReturnCode};
pub use connect::{Connect, Will};
pub use header::QoS;
pub use publish::Publish;
pub use subscribe::{SubAck, Subscribe};
pub use unsubscribe::Unsubscribe;
