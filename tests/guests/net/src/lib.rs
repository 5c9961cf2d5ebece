//! A script that opens a network connection. It imports `wasi:sockets`,
//! which sluice does not offer, so it must fail to load.

use sluice_guest::prelude::*;

pub fn parse(message: &Message) -> Result<Vec<Output>, ScriptError> {
    let target = message.text()?;
    match std::net::TcpStream::connect(target) {
        Ok(_) => Err(ScriptError::new(
            "escaped",
            format!("connected to {target}"),
        )),
        Err(error) => Err(ScriptError::new("net-denied", error.to_string())),
    }
}

sluice_guest::script!(parse);
