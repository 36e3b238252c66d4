//! cx-gateway
