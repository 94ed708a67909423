//! MQTT 3.1, 3.1.1 and 5 packets and the server-side session state machine.

mod ack;
mod auth;
mod codec;
mod connack;
mod connect;
mod disconnect;
mod header;
mod properties;
mod publish;
mod reason;
pub mod session;
mod subscribe;
mod unsubscribe;

pub use ack::AckV5;
pub use auth::Auth;
pub use codec::{decode, encode, encoded_len, DecodeError, Decoder, Packet};
pub use connack::{ConnAck, ConnAckV5, ConnectReturnCode};
pub use connect::{Connect, ConnectV5, Will};
pub use disconnect::DisconnectV5;
pub use header::{ProtocolVersion, QoS};
pub use properties::Properties;
pub use publish::{Publish, PublishV5};
pub use reason::ReasonCode;
pub use subscribe::{SubAck, SubAckV5, Subscribe, SubscribeV5, SubscriptionOptions};
pub use unsubscribe::{UnsubAckV5, Unsubscribe, UnsubscribeV5};
