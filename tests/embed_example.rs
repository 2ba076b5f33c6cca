//! `examples/embed.rs` is the library's documented example; this runs it as a test so it cannot
//! rot. It talks only to its own receiver on 127.0.0.1 and deletes its scratch data directory.

#[path = "../examples/embed.rs"]
mod embed;

#[test]
fn the_embedding_example_delivers_a_signed_event() {
    embed::main().expect("the example failed");
}
