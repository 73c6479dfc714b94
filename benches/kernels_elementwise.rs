fn main() {
    eprintln!("no benchmarks in this group yet");
}
