//! A user-space PulseAudio for audio-device tests (`../shared/DESIGN.md` §6).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private PulseAudio: null sink `vspk` (16 kHz mono) with a remap source `vmic` on its
/// monitor (the virtual microphone, the default source), and null sink `vout` (the
/// virtual speaker, the default sink).
pub struct Pulse {
    pub dir: PathBuf,
    pub child: Option<Child>,
}

impl Pulse {
    pub fn start(dir: &Path) -> Pulse {
        let mut p = Pulse { dir: dir.to_path_buf(), child: None };
        p.restart();
        p
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("run/native")
    }

    pub fn restart(&mut self) {
        std::fs::create_dir_all(self.dir.join("run")).unwrap();
        let child = Command::new("pulseaudio")
            .args(["-n", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no", "--disallow-exit"])
            .arg(format!("--load=module-native-protocol-unix auth-anonymous=1 socket={}", self.socket().display()))
            .arg("--load=module-null-sink sink_name=vspk rate=16000 channels=1 format=s16le")
            .arg("--load=module-remap-source source_name=vmic master=vspk.monitor")
            .arg("--load=module-null-sink sink_name=vout rate=24000 channels=1 format=s16le")
            .envs(self.env())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("pulseaudio is missing: run scripts/test, which installs it");
        self.child = Some(child);
        // Ready once it answers; then make the remap source the default input.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = Command::new("pactl").arg("info").envs(self.env()).stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success());
            if ok.unwrap_or(false) {
                break;
            }
            assert!(Instant::now() < deadline, "pulseaudio did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        for args in [["set-default-source", "vmic"], ["set-default-sink", "vout"]] {
            let st = Command::new("pactl").args(args).envs(self.env()).status().unwrap();
            assert!(st.success());
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("HOME".into(), self.dir.display().to_string()),
            ("XDG_RUNTIME_DIR".into(), self.dir.join("run").display().to_string()),
            ("PULSE_SERVER".into(), format!("unix:{}", self.socket().display())),
        ]
    }

    /// Plays a WAV into the virtual microphone in real time; returns when it is done.
    pub fn play(&self, wav: &Path) {
        let st = Command::new("paplay").args(["-d", "vspk"]).arg(wav).envs(self.env()).status().expect("paplay");
        assert!(st.success(), "paplay failed");
    }
}

impl Drop for Pulse {
    fn drop(&mut self) {
        self.stop();
    }
}


/// Makes this process's ALSA default device the private PulseAudio (through `~/.asoundrc`
/// and the environment). Process-wide: one such test per test binary.
pub fn route_alsa_to(pulse: &Pulse) {
    std::fs::write(pulse.dir.join(".asoundrc"), "pcm.!default { type pulse }\nctl.!default { type pulse }\n").unwrap();
    for (k, v) in pulse.env() {
        std::env::set_var(k, v);
    }
}

/// Records a source with `parec` (16 kHz mono) until dropped; samples with arrival times.
pub struct Recorder {
    child: Child,
    pub samples: std::sync::Arc<std::sync::Mutex<Vec<i16>>>,
}

impl Recorder {
    pub fn start(pulse: &Pulse, source: &str) -> Recorder {
        use std::io::Read;
        let mut child = Command::new("parec")
            .args(["-d", source, "--rate=16000", "--channels=1", "--format=s16le", "--latency-msec=10"])
            .envs(pulse.env())
            .stdout(Stdio::piped())
            .spawn()
            .expect("parec");
        let mut out = child.stdout.take().unwrap();
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = samples.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 640];
            while out.read_exact(&mut buf).is_ok() {
                let mut v = s.lock().unwrap();
                v.extend(buf.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])));
            }
        });
        Recorder { child, samples }
    }

    /// Milliseconds between the first and the last sample louder than `threshold`.
    pub fn loud_span_ms(&self, threshold: i16) -> f64 {
        let v = self.samples.lock().unwrap();
        match (v.iter().position(|x| x.abs() > threshold), v.iter().rposition(|x| x.abs() > threshold)) {
            (Some(a), Some(b)) => (b - a) as f64 / 16.0,
            _ => 0.0,
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
