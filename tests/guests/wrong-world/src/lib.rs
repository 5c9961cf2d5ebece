//! A component that exports `parse` with the wrong signature: it must fail
//! to load with a clear error, not on the first message.

wit_bindgen::generate!({
    inline: r#"
        package sluice:script@0.1.0;

        world script {
            export parse: func(message: string) -> string;
        }
    "#,
    world: "script",
});

struct WrongWorld;

impl Guest for WrongWorld {
    fn parse(message: String) -> String {
        message
    }
}

export!(WrongWorld);
