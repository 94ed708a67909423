//! Device payload decoders (JSON, Protobuf) into canonical records.
