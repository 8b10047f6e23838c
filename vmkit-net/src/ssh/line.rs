//! The prompt's line editor: the bytes a client's terminal sends in, the edits they
//! make and the bytes that show them out. No I/O, so that every key is tested.
//!
//! Keys: printable text (UTF-8) is inserted at the cursor; left and right (arrows,
//! `^B`, `^F`), word left and right (`ESC b`, `ESC f`, `^←`, `^→`), home and end
//! (`^A`, `^E`, Home, End), backspace and delete (`^H`, DEL, Delete, `^D` on a
//! non-empty line), `^U` (cut to the start), `^K` (cut to the end), `^W` (cut the
//! word before the cursor), `^L` (clear the screen), history (up and down, `^P`,
//! `^N`), tab (complete: the editor asks, [`Key::Complete`], and the caller answers
//! with [`LineEditor::complete`]), `^C` (drop the line), `^D` on an empty line
//! ([`Key::Eof`]), Enter ([`Key::Line`]). Unknown escape sequences are ignored.
//!
//! A line longer than the terminal wraps; the editor redraws it from its first row
//! with the terminal's width ([`LineEditor::set_width`]), counting one column per
//! character (wide characters are not measured).
//!
//! Without a terminal ([`LineEditor::new`] with `echo` off) nothing is written
//! back: the client's lines are taken as they come, `\n` or `\r` ending each.
//!
//! Everything is bounded: the line ([`MAX_LINE`] characters), the history
//! ([`HISTORY`] lines), an escape sequence being read (16 bytes).

use std::collections::VecDeque;

/// The lines a session's history keeps (the oldest go first).
pub const HISTORY: usize = 100;

/// The longest line, in characters; more typed is dropped (with a bell).
pub const MAX_LINE: usize = 4096;

/// The longest escape sequence read; a longer one is dropped whole.
const MAX_ESCAPE: usize = 16;

/// The width assumed until the client says.
const DEFAULT_WIDTH: usize = 80;

/// What a key asks of the caller beyond editing the line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// Enter: the line to run. The editor moved to a new row and added the line to
    /// its history; write the command's output, then call [`LineEditor::start`].
    Line(String),
    /// Tab: answer with [`LineEditor::complete`] and the candidates for the
    /// [`LineEditor::completing`] word.
    Complete,
    /// `^D` on an empty line, or `^C` without a terminal: leave.
    Eof,
}

/// An escape sequence being read.
#[derive(Debug, Default)]
struct Escape {
    bytes: Vec<u8>,
}

/// One session's line editor.
#[derive(Debug)]
pub struct LineEditor {
    prompt: String,
    echo: bool,
    line: Vec<char>,
    /// Where the cursor is, in characters of `line`.
    cursor: usize,
    width: usize,
    /// The terminal cursor's row, counted from the prompt's first row.
    row: usize,
    history: VecDeque<String>,
    /// The history line shown by up and down; `None`: the one being typed.
    browsing: Option<usize>,
    /// The line being typed, kept while the history is browsed.
    draft: Vec<char>,
    escape: Option<Escape>,
    /// The bytes of a UTF-8 character not all read yet.
    utf8: Vec<u8>,
    /// The last byte was `\r` (a `\n` after it ends no second line).
    after_cr: bool,
}

impl LineEditor {
    /// An editor writing `prompt`; with `echo` (a terminal) it shows what is typed.
    pub fn new(prompt: impl Into<String>, echo: bool) -> Self {
        Self {
            prompt: prompt.into(),
            echo,
            line: Vec::new(),
            cursor: 0,
            width: DEFAULT_WIDTH,
            row: 0,
            history: VecDeque::new(),
            browsing: None,
            draft: Vec::new(),
            escape: None,
            utf8: Vec::new(),
            after_cr: false,
        }
    }

    /// Sets the terminal's width in columns (0: unknown, 80 assumed); the next
    /// redraw uses it.
    pub fn set_width(&mut self, columns: u32) {
        self.width = match columns {
            0 => DEFAULT_WIDTH,
            n => n.min(4096) as usize,
        };
    }

    /// The line as typed so far.
    pub fn line(&self) -> String {
        self.line.iter().collect()
    }

    /// The history, oldest first.
    #[cfg(test)]
    fn history(&self) -> impl Iterator<Item = &str> {
        self.history.iter().map(String::as_str)
    }

    /// Starts a new, empty line: writes the prompt.
    pub fn start(&mut self, out: &mut Vec<u8>) {
        self.line.clear();
        self.cursor = 0;
        self.row = 0;
        self.browsing = None;
        self.draft.clear();
        if self.echo {
            out.extend_from_slice(self.prompt.as_bytes());
        }
    }

    /// Reads the bytes the client sent: edits, and what to show of them in `out`.
    /// Stops at the first byte that asks the caller something, answering it and how
    /// many bytes were used; `None` when all of `bytes` were used.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Option<(Key, usize)> {
        for (i, &byte) in bytes.iter().enumerate() {
            if let Some(key) = self.byte(byte, out) {
                return Some((key, i + 1));
            }
        }
        None
    }

    fn byte(&mut self, byte: u8, out: &mut Vec<u8>) -> Option<Key> {
        let after_cr = std::mem::replace(&mut self.after_cr, byte == b'\r');
        if let Some(escape) = &mut self.escape {
            escape.bytes.push(byte);
            return self.escape_byte(out);
        }
        if byte < 0x80 {
            // A character cut short by a plain byte: dropped.
            self.utf8.clear();
        } else {
            self.utf8.push(byte);
            match std::str::from_utf8(&self.utf8) {
                Ok(text) => {
                    let c = text.chars().next();
                    self.utf8.clear();
                    if let Some(c) = c.filter(|c| !c.is_control()) {
                        self.insert(&[c], out);
                    }
                }
                Err(e) if e.error_len().is_some() || self.utf8.len() >= 4 => self.utf8.clear(),
                Err(_) => {}
            }
            return None;
        }
        match byte {
            b'\r' => return Some(self.enter(out)),
            b'\n' if after_cr => {}
            b'\n' => return Some(self.enter(out)),
            b'\t' if self.echo => return Some(Key::Complete),
            b'\t' => self.insert(&[' '], out),
            0x01 => self.move_to(0, out),
            0x02 => self.move_to(self.cursor.saturating_sub(1), out),
            0x03 if !self.echo => return Some(Key::Eof),
            0x03 => {
                self.end_of_line(out);
                out.extend_from_slice(b"^C\r\n");
                self.start(out);
            }
            0x04 if self.line.is_empty() => return Some(Key::Eof),
            0x04 => self.delete_forward(out),
            0x05 => self.move_to(self.line.len(), out),
            0x06 => self.move_to(self.cursor + 1, out),
            0x08 | 0x7f => self.backspace(out),
            0x0b => {
                self.line.truncate(self.cursor);
                self.refresh(out);
            }
            0x0c if self.echo => {
                out.extend_from_slice(b"\x1b[H\x1b[2J");
                self.row = 0;
                self.refresh(out);
            }
            0x0e => self.history_next(out),
            0x10 => self.history_prev(out),
            0x15 => {
                self.line.drain(..self.cursor);
                self.cursor = 0;
                self.refresh(out);
            }
            0x17 => {
                let start = self.word_left();
                self.line.drain(start..self.cursor);
                self.cursor = start;
                self.refresh(out);
            }
            0x1b => self.escape = Some(Escape::default()),
            0x20..=0x7e => self.insert(&[byte as char], out),
            _ => {}
        }
        None
    }

    /// One more byte of an escape sequence: acts once it is complete.
    fn escape_byte(&mut self, out: &mut Vec<u8>) -> Option<Key> {
        let Some(escape) = &self.escape else {
            return None;
        };
        let bytes = escape.bytes.clone();
        let complete = match bytes.as_slice() {
            [] => false,
            [b'[' | b'O'] => false,
            [b'[' | b'O', .., last] => (0x40..=0x7e).contains(last),
            [_] => true,
            // Not reached: a sequence of two bytes or more starts with `[` or `O`.
            _ => true,
        };
        if !complete {
            if bytes.len() >= MAX_ESCAPE {
                self.escape = None;
            }
            return None;
        }
        self.escape = None;
        match bytes.as_slice() {
            b"[A" | b"OA" => self.history_prev(out),
            b"[B" | b"OB" => self.history_next(out),
            b"[C" | b"OC" => self.move_to(self.cursor + 1, out),
            b"[D" | b"OD" => self.move_to(self.cursor.saturating_sub(1), out),
            b"[H" | b"OH" | b"[1~" | b"[7~" => self.move_to(0, out),
            b"[F" | b"OF" | b"[4~" | b"[8~" => self.move_to(self.line.len(), out),
            b"[3~" => self.delete_forward(out),
            b"b" | b"[1;5D" | b"[1;3D" => self.move_to(self.word_left(), out),
            b"f" | b"[1;5C" | b"[1;3C" => self.move_to(self.word_right(), out),
            _ => {}
        }
        None
    }

    fn enter(&mut self, out: &mut Vec<u8>) -> Key {
        self.end_of_line(out);
        if self.echo {
            let end = self.prompt_len() + self.line.len();
            // A line that ended at the margin left the cursor on a fresh row.
            out.extend_from_slice(match end.is_multiple_of(self.width) && end > 0 {
                true => b"\r",
                false => b"\r\n",
            });
        }
        let line = self.line();
        if !line.trim().is_empty() && self.history.back() != Some(&line) {
            if self.history.len() >= HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(line.clone());
        }
        self.line.clear();
        self.cursor = 0;
        self.row = 0;
        self.browsing = None;
        Key::Line(line)
    }

    /// Moves the terminal's cursor to the end of the line (for what comes below).
    fn end_of_line(&mut self, out: &mut Vec<u8>) {
        if !self.echo {
            return;
        }
        let end = self.prompt_len() + self.line.len();
        let end_row = end / self.width;
        if end_row > self.row {
            out.extend_from_slice(format!("\x1b[{}B", end_row - self.row).as_bytes());
        }
        self.row = end_row;
    }

    fn prompt_len(&self) -> usize {
        self.prompt.chars().count()
    }

    fn insert(&mut self, chars: &[char], out: &mut Vec<u8>) {
        if self.line.len() + chars.len() > MAX_LINE {
            if self.echo {
                out.push(0x07);
            }
            return;
        }
        let at_end = self.cursor == self.line.len();
        self.line
            .splice(self.cursor..self.cursor, chars.iter().copied());
        self.cursor += chars.len();
        if !self.echo {
            return;
        }
        let end = self.prompt_len() + self.line.len();
        if at_end && !end.is_multiple_of(self.width) {
            // Typing at the end: only the new text, no redraw.
            out.extend(chars.iter().collect::<String>().bytes());
            self.row = end / self.width;
        } else {
            self.refresh(out);
        }
    }

    fn backspace(&mut self, out: &mut Vec<u8>) {
        if self.cursor == 0 {
            return;
        }
        self.cursor -= 1;
        self.line.remove(self.cursor);
        self.refresh(out);
    }

    fn delete_forward(&mut self, out: &mut Vec<u8>) {
        if self.cursor < self.line.len() {
            self.line.remove(self.cursor);
            self.refresh(out);
        }
    }

    fn move_to(&mut self, position: usize, out: &mut Vec<u8>) {
        let position = position.min(self.line.len());
        if position != self.cursor {
            self.cursor = position;
            self.refresh(out);
        }
    }

    /// The start of the word before the cursor.
    fn word_left(&self) -> usize {
        let mut at = self.cursor;
        while at > 0 && self.line[at - 1].is_whitespace() {
            at -= 1;
        }
        while at > 0 && !self.line[at - 1].is_whitespace() {
            at -= 1;
        }
        at
    }

    /// The end of the word after the cursor.
    fn word_right(&self) -> usize {
        let mut at = self.cursor;
        while at < self.line.len() && self.line[at].is_whitespace() {
            at += 1;
        }
        while at < self.line.len() && !self.line[at].is_whitespace() {
            at += 1;
        }
        at
    }

    fn history_prev(&mut self, out: &mut Vec<u8>) {
        let at = match self.browsing {
            None if self.history.is_empty() => return,
            None => {
                self.draft = std::mem::take(&mut self.line);
                self.history.len() - 1
            }
            Some(0) => return,
            Some(at) => at - 1,
        };
        self.browsing = Some(at);
        self.show(self.history[at].chars().collect(), out);
    }

    fn history_next(&mut self, out: &mut Vec<u8>) {
        match self.browsing {
            None => {}
            Some(at) if at + 1 < self.history.len() => {
                self.browsing = Some(at + 1);
                self.show(self.history[at + 1].chars().collect(), out);
            }
            Some(_) => {
                self.browsing = None;
                let draft = std::mem::take(&mut self.draft);
                self.show(draft, out);
            }
        }
    }

    fn show(&mut self, line: Vec<char>, out: &mut Vec<u8>) {
        self.line = line;
        self.cursor = self.line.len();
        self.refresh(out);
    }

    /// Draws the prompt and the line again from the prompt's first row, and puts
    /// the cursor where it is in the line.
    fn refresh(&mut self, out: &mut Vec<u8>) {
        if !self.echo {
            return;
        }
        let width = self.width;
        let mut text = String::new();
        if self.row > 0 {
            text.push_str(&format!("\x1b[{}A", self.row));
        }
        text.push_str("\r\x1b[J");
        text.push_str(&self.prompt);
        text.extend(self.line.iter());
        let end = self.prompt_len() + self.line.len();
        if end > 0 && end.is_multiple_of(width) {
            // The terminal waits at the margin; move to the next row's start.
            text.push_str("\r\n");
        }
        let end_row = end / width;
        let at = self.prompt_len() + self.cursor;
        let (row, column) = (at / width, at % width);
        if end_row > row {
            text.push_str(&format!("\x1b[{}A", end_row - row));
        }
        text.push('\r');
        if column > 0 {
            text.push_str(&format!("\x1b[{column}C"));
        }
        self.row = row;
        out.extend_from_slice(text.as_bytes());
    }

    /// The words before the cursor (the last one, possibly empty, is the one
    /// being completed).
    pub fn completing(&self) -> Vec<String> {
        let before: String = self.line[..self.cursor].iter().collect();
        let mut words: Vec<String> = before.split_whitespace().map(str::to_owned).collect();
        if before.is_empty() || before.ends_with(char::is_whitespace) {
            words.push(String::new());
        }
        words
    }

    /// Completes the word before the cursor from `candidates` (the whole words it
    /// may become): one match is inserted with a space after it, several their
    /// common start, and when that adds nothing they are listed below the line.
    pub fn complete(&mut self, candidates: &[String], out: &mut Vec<u8>) {
        let words = self.completing();
        let word = words.last().map(String::as_str).unwrap_or("");
        let mut matches: Vec<&str> = candidates
            .iter()
            .map(String::as_str)
            .filter(|c| c.starts_with(word))
            .collect();
        matches.sort_unstable();
        matches.dedup();
        match matches.as_slice() {
            [] => out.push(0x07),
            [one] => {
                let mut rest: Vec<char> = one[word.len()..].chars().collect();
                if self.line.get(self.cursor) != Some(&' ') {
                    rest.push(' ');
                }
                self.insert(&rest, out);
            }
            many => {
                let common = common_prefix(many);
                if common.len() > word.len() {
                    let rest: Vec<char> = common[word.len()..].chars().collect();
                    self.insert(&rest, out);
                } else {
                    self.end_of_line(out);
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(many.join("  ").as_bytes());
                    out.extend_from_slice(b"\r\n");
                    self.row = 0;
                    let cursor = self.cursor;
                    self.cursor = self.line.len();
                    out.extend_from_slice(self.prompt.as_bytes());
                    out.extend(self.line.iter().collect::<String>().bytes());
                    let end = self.prompt_len() + self.line.len();
                    self.row = end / self.width;
                    if end.is_multiple_of(self.width) && end > 0 {
                        out.extend_from_slice(b"\r\n");
                    }
                    self.move_to(cursor, out);
                }
            }
        }
    }
}

/// The longest start all of `words` share.
fn common_prefix<'a>(words: &[&'a str]) -> &'a str {
    let Some(first) = words.first() else {
        return "";
    };
    let mut len = first.len();
    for word in &words[1..] {
        len = first
            .char_indices()
            .zip(word.chars())
            .take_while(|((_, a), b)| a == b)
            .map(|((i, a), _)| i + a.len_utf8())
            .last()
            .unwrap_or(0)
            .min(len);
    }
    &first[..len]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An editor with a terminal of `width` columns, prompt `> `.
    fn editor(width: u32) -> LineEditor {
        let mut editor = LineEditor::new("> ", true);
        editor.set_width(width);
        editor.start(&mut Vec::new());
        editor
    }

    /// Feeds `input`; the keys it asked for and everything written.
    fn type_in(editor: &mut LineEditor, input: &[u8]) -> (Vec<Key>, String) {
        let mut out = Vec::new();
        let mut keys = Vec::new();
        let mut rest = input;
        while let Some((key, used)) = editor.feed(rest, &mut out) {
            keys.push(key);
            rest = &rest[used..];
        }
        (keys, String::from_utf8_lossy(&out).into_owned())
    }

    fn line(s: &str) -> Key {
        Key::Line(s.to_owned())
    }

    #[test]
    fn typed_text_is_echoed_and_enter_answers_the_line() {
        let mut e = editor(80);
        let (keys, out) = type_in(&mut e, b"ls -l\r");
        assert_eq!(keys, vec![line("ls -l")]);
        assert_eq!(out, "ls -l\r\n");
    }

    #[test]
    fn a_crlf_or_a_lone_lf_ends_one_line() {
        let mut e = LineEditor::new("> ", false);
        let (keys, out) = type_in(&mut e, b"ls\r\nwhoami\nhelp\r");
        assert_eq!(keys, vec![line("ls"), line("whoami"), line("help")]);
        assert_eq!(out, "", "nothing is echoed without a terminal");
    }

    #[test]
    fn cursor_keys_move_and_text_goes_in_at_the_cursor() {
        let mut e = editor(80);
        // "ac", left, "b", home, "x", end, "y"; arrows, ^B, ^A and ^E.
        let (keys, _) = type_in(&mut e, b"ac\x1b[Db\x01x\x05y\r");
        assert_eq!(keys, vec![line("xabcy")]);
        let (keys, _) = type_in(&mut e, b"ac\x02b\x1bOHx\x1b[Fy\x1b[1~z\x06\x06\r");
        assert_eq!(keys, vec![line("zxabcy")]);
    }

    #[test]
    fn backspace_and_delete_remove_a_character() {
        let mut e = editor(80);
        let (keys, _) = type_in(&mut e, b"abcd\x7f\x08\x01\x1b[3~\r");
        assert_eq!(keys, vec![line("b")]);
        let (keys, _) = type_in(&mut e, b"abc\x01\x04\r");
        assert_eq!(keys, vec![line("bc")], "^D on a line deletes forward");
    }

    #[test]
    fn ctrl_u_k_and_w_cut() {
        let mut e = editor(80);
        let (keys, _) = type_in(&mut e, b"rm web db\x17\r");
        assert_eq!(keys, vec![line("rm web ")]);
        let (keys, _) = type_in(&mut e, b"rm web db\x1b[D\x1b[D\x15\r");
        assert_eq!(keys, vec![line("db")]);
        let (keys, _) = type_in(&mut e, b"rm web db\x01\x1bf\x0b\r");
        assert_eq!(keys, vec![line("rm")]);
    }

    #[test]
    fn ctrl_c_drops_the_line_and_ctrl_d_on_an_empty_one_leaves() {
        let mut e = editor(80);
        let (keys, out) = type_in(&mut e, b"rm web\x03");
        assert!(keys.is_empty());
        assert!(out.ends_with("^C\r\n> "), "{out:?}");
        assert_eq!(e.line(), "");
        let (keys, _) = type_in(&mut e, b"\x04");
        assert_eq!(keys, vec![Key::Eof]);
    }

    #[test]
    fn history_goes_back_and_forth_and_keeps_the_line_being_typed() {
        let mut e = editor(80);
        type_in(&mut e, b"ls\rwhoami\r");
        let (keys, _) = type_in(&mut e, b"he\x1b[A\x1b[A\r");
        assert_eq!(keys, vec![line("ls")]);
        let (keys, _) = type_in(&mut e, b"he\x10\x0e\x0elp\r");
        assert_eq!(
            keys,
            vec![line("help")],
            "down past the newest gives the draft back"
        );
        let history: Vec<&str> = e.history().collect();
        assert_eq!(history, ["ls", "whoami", "ls", "help"]);
    }

    #[test]
    fn history_is_bounded_and_skips_repeats_and_blank_lines() {
        let mut e = editor(80);
        for i in 0..HISTORY + 10 {
            type_in(&mut e, format!("ls {i}\r").as_bytes());
        }
        type_in(&mut e, b"ls x\rls x\r   \r");
        let history: Vec<&str> = e.history().collect();
        assert_eq!(history.len(), HISTORY);
        assert_eq!(history.last(), Some(&"ls x"));
        assert_eq!(history[HISTORY - 2], format!("ls {}", HISTORY + 9));
    }

    #[test]
    fn a_line_is_bounded() {
        let mut e = editor(80);
        let (_, out) = type_in(&mut e, &vec![b'a'; MAX_LINE + 100]);
        assert_eq!(e.line().len(), MAX_LINE);
        assert!(out.ends_with('\x07'));
    }

    #[test]
    fn an_endless_escape_sequence_is_dropped() {
        let mut e = editor(80);
        let mut input = b"\x1b[".to_vec();
        input.extend(std::iter::repeat_n(b'1', 1000));
        input.extend_from_slice(b"ab\r");
        let (keys, _) = type_in(&mut e, &input);
        assert_eq!(keys.len(), 1);
        assert!(matches!(&keys[0], Key::Line(l) if l.ends_with("ab")));
    }

    #[test]
    fn utf8_is_decoded_across_reads_and_invalid_bytes_dropped() {
        let mut e = editor(80);
        let text = "é€".as_bytes();
        type_in(&mut e, &text[..1]);
        type_in(&mut e, &text[1..4]);
        type_in(&mut e, &text[4..]);
        let (keys, _) = type_in(&mut e, b"\xff\x1b[Dx\r");
        assert_eq!(keys, vec![line("éx€")]);
    }

    #[test]
    fn tab_asks_and_one_candidate_completes_with_a_space() {
        let mut e = editor(80);
        let (keys, _) = type_in(&mut e, b"wh\t");
        assert_eq!(keys, vec![Key::Complete]);
        assert_eq!(e.completing(), ["wh"]);
        let mut out = Vec::new();
        e.complete(&["whoami".into(), "ls".into()], &mut out);
        assert_eq!(e.line(), "whoami ");
        assert_eq!(String::from_utf8_lossy(&out), "oami ");
    }

    #[test]
    fn several_candidates_complete_their_common_start_then_are_listed() {
        let mut e = editor(80);
        type_in(&mut e, b"stop w\t");
        assert_eq!(e.completing(), ["stop", "w"]);
        let candidates = ["web1".to_owned(), "web2".to_owned(), "db".to_owned()];
        let mut out = Vec::new();
        e.complete(&candidates, &mut out);
        assert_eq!(e.line(), "stop web");
        let mut out = Vec::new();
        e.complete(&candidates, &mut out);
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("\r\nweb1  web2\r\n> stop web"), "{out:?}");
        assert_eq!(e.line(), "stop web");
        let mut out = Vec::new();
        e.complete(&[], &mut out);
        assert_eq!(out, b"\x07", "nothing to complete rings the bell");
    }

    #[test]
    fn after_a_space_the_next_word_is_completed() {
        let mut e = editor(80);
        type_in(&mut e, b"start ");
        assert_eq!(e.completing(), ["start", ""]);
    }

    #[test]
    fn a_wrapped_line_is_redrawn_from_its_first_row() {
        // Width 10, prompt "> ": 12 characters fill the first row and 4 the second.
        let mut e = editor(10);
        type_in(&mut e, b"abcdefghijkl");
        let (_, out) = type_in(&mut e, b"\x01");
        // Up one row to the prompt's, clear, draw, back up to the cursor's row,
        // then to column 2.
        assert_eq!(out, "\x1b[1A\r\x1b[J> abcdefghijkl\x1b[1A\r\x1b[2C");
        let (_, out) = type_in(&mut e, b"\x05");
        assert_eq!(out, "\r\x1b[J> abcdefghijkl\r\x1b[4C");
    }

    #[test]
    fn the_width_from_a_window_change_is_used() {
        let mut e = editor(80);
        type_in(&mut e, b"abcdefghijkl");
        e.set_width(10);
        let (_, out) = type_in(&mut e, b"\x01");
        assert!(out.ends_with("\x1b[1A\r\x1b[2C"), "{out:?}");
    }

    #[test]
    fn a_line_ending_at_the_margin_puts_the_cursor_on_the_next_row() {
        let mut e = editor(10);
        type_in(&mut e, b"abcdefgh");
        let (_, out) = type_in(&mut e, b"\x01\x05");
        assert!(out.ends_with("> abcdefgh\r\n\r"), "{out:?}");
        let (keys, out) = type_in(&mut e, b"\r");
        assert_eq!(keys, vec![line("abcdefgh")]);
        assert_eq!(out, "\r", "no blank row under the line");
    }

    #[test]
    fn enter_in_the_middle_of_a_wrapped_line_moves_below_it_first() {
        let mut e = editor(10);
        type_in(&mut e, b"abcdefghijkl\x01");
        let (_, out) = type_in(&mut e, b"\r");
        assert_eq!(out, "\x1b[1B\r\n");
    }

    /// A small deterministic generator (xorshift64), so that a failure repeats.
    struct Bytes(u64);

    impl Bytes {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// A byte a terminal, or a hostile client, might send: control keys, escape
        /// sequence pieces, UTF-8 pieces, text.
        fn byte(&mut self) -> u8 {
            const PIECES: &[u8] = b"\x1b[O~;1235ABCDFHbf\r\n\t\x01\x02\x03\x04\x05\x06\x08\x0b\x0c\x0e\x10\x15\x17\x7f\xc3\xa9\xe2\x82\xac\xff";
            match self.next() % 3 {
                0 => PIECES[(self.next() % PIECES.len() as u64) as usize],
                1 => b'a' + (self.next() % 26) as u8,
                _ => self.next() as u8,
            }
        }
    }

    #[test]
    fn arbitrary_bytes_keep_the_editor_bounded_and_the_line_printable() {
        let mut bytes = Bytes(0x9e37_79b9_7f4a_7c15);
        for round in 0..200 {
            let echo = round % 5 != 0;
            let mut e = LineEditor::new("vmkit> ", echo);
            e.set_width((bytes.next() % 120) as u32);
            e.start(&mut Vec::new());
            for _ in 0..1000 {
                let input: Vec<u8> = (0..1 + bytes.next() % 16).map(|_| bytes.byte()).collect();
                let mut out = Vec::new();
                let mut rest = &input[..];
                while let Some((key, used)) = e.feed(rest, &mut out) {
                    rest = &rest[used..];
                    match key {
                        Key::Line(line) => {
                            assert!(!line.chars().any(char::is_control), "{line:?}");
                            e.start(&mut out);
                        }
                        Key::Complete => e.complete(&["alpha".into(), "alps".into()], &mut out),
                        Key::Eof => e.start(&mut out),
                    }
                }
                if bytes.next().is_multiple_of(50) {
                    e.set_width((bytes.next() % 200) as u32);
                }
                assert!(e.cursor <= e.line.len());
                assert!(e.line.len() <= MAX_LINE);
                assert!(e.history.len() <= HISTORY);
                assert!(e.escape.as_ref().is_none_or(|x| x.bytes.len() < MAX_ESCAPE));
                assert!(e.utf8.len() < 4);
                assert!(!e.line.iter().any(|c| c.is_control()), "{:?}", e.line());
                assert!(
                    echo || out.is_empty(),
                    "nothing is echoed without a terminal"
                );
            }
        }
    }

    #[test]
    fn ctrl_l_clears_the_screen_and_redraws() {
        let mut e = editor(80);
        type_in(&mut e, b"ls");
        let (_, out) = type_in(&mut e, b"\x0c");
        assert_eq!(out, "\x1b[H\x1b[2J\r\x1b[J> ls\r\x1b[4C");
    }
}
