//! Close codes for sockets that break the WebSocket protocol itself
//! (RFC 6455 §7.4.1): tungstenite reports these as read errors, which the
//! session turns into a close frame with the code that names the fault.

use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::link::CloseReason;

/// Close code: the peer broke the WebSocket protocol.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code: a text frame (or close reason) that is not valid UTF-8.
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
/// Why to close after a read error, if the socket can still be told.
pub fn close_reason_for(e: &axum::Error) -> Option<CloseReason> {
    // axum::Error's source is the tungstenite error it wraps.
    let inner = std::error::Error::source(e)?.downcast_ref::<WsError>()?;
    code_for(inner)
}

fn code_for(e: &WsError) -> Option<CloseReason> {
    use ProtocolError as P;
    match e {
        WsError::Capacity(_) => Some(CloseReason::TooBig),
        WsError::Utf8(_) => Some(CloseReason::InvalidPayload),
        WsError::Protocol(
            P::NonZeroReservedBits
            | P::UnmaskedFrameFromClient
            | P::FragmentedControlFrame
            | P::ControlFrameTooBig
            | P::UnknownControlFrameType(_)
            | P::UnknownDataFrameType(_)
            | P::UnexpectedContinueFrame
            | P::ExpectedFragment(_)
            | P::InvalidOpcode(_)
            | P::InvalidCloseSequence,
        ) => Some(CloseReason::ProtocolError),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_violations_map_to_1002_and_bad_utf8_to_1007() {
        let e = axum::Error::new(WsError::Protocol(ProtocolError::NonZeroReservedBits));
        assert_eq!(close_reason_for(&e), Some(CloseReason::ProtocolError));
        let e = axum::Error::new(WsError::Utf8("bad".into()));
        assert_eq!(close_reason_for(&e), Some(CloseReason::InvalidPayload));
        let e = axum::Error::new(WsError::Protocol(
            ProtocolError::ResetWithoutClosingHandshake,
        ));
        assert_eq!(close_reason_for(&e), None);
    }
}
