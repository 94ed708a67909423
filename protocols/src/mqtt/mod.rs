//! MQTT packets and the server-side session state machine.
