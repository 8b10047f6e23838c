//! The few pages the edge serves itself: sign-in, signed out, errors.

/// `s` with the characters HTML gives meaning to escaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page with `title` and `body` (already HTML).
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>\
         body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;\
         line-height:1.5;color:#222}}code,pre{{background:#f3f3f3;padding:.1rem .3rem;\
         border-radius:3px}}pre{{padding:.6rem}}button{{font-size:1rem}}</style></head>\
         <body><h1>{title}</h1>\n{body}\n</body></html>\n",
        title = escape(title)
    )
}

/// The apex page for someone not signed in; with `email`, a form that mails a
/// sign-in link too.
pub fn sign_in(lobby: &str, wanted: Option<&str>, email: bool) -> String {
    let wanted = wanted
        .map(|h| format!("<p>to reach <code>{}</code></p>", escape(h)))
        .unwrap_or_default();
    let email = match email {
        true => {
            "<p>Or have a sign-in link sent to the email address of your account:</p>\
                 <form method=\"post\" action=\"/__vmkit/email\">\
                 <label>Email <input type=\"email\" name=\"email\" required \
                 autocomplete=\"email\"></label> <button>Send me a link</button></form>"
        }
        false => "",
    };
    page(
        "Sign in",
        &format!(
            "{wanted}<p>Sign in from a terminal with your SSH key:</p>\
             <pre>{lobby} browser</pre>\
             <p>and open the link it prints. Then come back to this page.</p>{email}",
            lobby = escape(lobby)
        ),
    )
}

/// The answer to a sign-in link asked for by email, whether or not the address
/// is a user's (the page says nothing about that).
pub fn email_sent(address: &str) -> String {
    page(
        "Check your email",
        &format!(
            "<p>If <code>{}</code> is the address of an account here, a sign-in link is on \
             its way. It works once, within 10 minutes.</p>",
            escape(address)
        ),
    )
}

/// The apex page for a signed-in user.
pub fn signed_in(handle: &str) -> String {
    page(
        "vmkit",
        &format!(
            "<p>Signed in as <b>{}</b>.</p>\
             <form method=\"post\" action=\"/__vmkit/logout\"><button>Sign out</button></form>\
             <form method=\"post\" action=\"/__vmkit/logout?everywhere=1\">\
             <button>Sign out everywhere</button></form>",
            escape(handle)
        ),
    )
}

/// A page asking to confirm signing out (what a link to the logout path shows).
pub fn confirm_sign_out(everywhere: bool) -> String {
    let action = if everywhere {
        "/__vmkit/logout?everywhere=1"
    } else {
        "/__vmkit/logout"
    };
    page(
        "Sign out",
        &format!("<form method=\"post\" action=\"{action}\"><button>Sign out</button></form>"),
    )
}

/// The owner's page when the VM answers nothing on the port.
pub fn nothing_listening(name: &str, port: u16, ssh: &str, lobby: &str, detail: &str) -> String {
    page(
        "Nothing is listening",
        &format!(
            "<p>VM <b>{name}</b> is running, but nothing answers on port <b>{port}</b> \
             ({detail}).</p>\
             <p>Start a web server in it that listens on port {port} (on any address; \
             <code>0.0.0.0</code> or the VM's own), for example:</p>\
             <pre>{ssh}\npython3 -m http.server {port}</pre>\
             <p>or point this address at another port: <code>share port {name} PORT</code> \
             in the lobby (<code>{lobby}</code>). Only you see this page; others get a plain \
             error.</p>",
            name = escape(name),
            ssh = escape(ssh),
            detail = escape(detail),
            lobby = escape(lobby),
        ),
    )
}

/// A plain error page.
pub fn error(status: u16, reason: &str) -> String {
    page(&format!("{status} {reason}"), "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_users_write_is_escaped() {
        assert_eq!(
            escape("<script>\"x\"&'y'"),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;"
        );
        assert!(!signed_in("<b>").contains("<b><b>"));
    }
}
