//! Stateful emulator of the Retently and Retainly REST APIs.
