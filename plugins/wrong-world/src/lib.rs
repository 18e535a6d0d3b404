//! wrong-world: a valid component that implements some other world than evhost's.

wit_bindgen::generate!({
    inline: "package test:other; world other { export greet: func() -> string; }",
});

struct Other;

impl Guest for Other {
    fn greet() -> String {
        "hello".into()
    }
}

export!(Other);
