# A minimal WebSocket chat: GET / serves a page whose script opens
# ws://<host>/ws; every text message one client sends is broadcast to every
# connected client (with a single client it is an echo).
#
# Plain PAGI (Future::AsyncAwait and Future only), so it runs unchanged on
# pagi-rs and on the reference server.  Loaded with `do`: the file's last
# expression (the coderef) is the application.
use strict;
use warnings;
use Future;
use Future::AsyncAwait;

# The page is ASCII, so its length in characters is its length in bytes.
my $page = <<'HTML';
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>PAGI WebSocket chat</title>
<style>
  body { font-family: sans-serif; max-width: 40em; margin: 2em auto; }
  #log { border: 1px solid #ccc; height: 20em; overflow-y: auto; padding: .5em; }
  #log p { margin: .2em 0; }
  .sys { color: #888; }
</style>
</head>
<body>
<h1>PAGI WebSocket chat</h1>
<p>Open this page in two windows: what one sends, both receive.</p>
<div id="log"></div>
<form id="form">
  <input id="msg" autocomplete="off" size="50" autofocus>
  <button>Send</button>
</form>
<script>
// Everything the page saw is kept in window.chat, so a test driving the
// browser can read the outcome without scraping the DOM.
window.chat = { opened: false, received: [], sent: [], close: null, errors: 0 };

function show(text, cls) {
  const p = document.createElement('p');
  p.textContent = text;
  if (cls) p.className = cls;
  const log = document.getElementById('log');
  log.appendChild(p);
  log.scrollTop = log.scrollHeight;
}

const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
const ws = new WebSocket(scheme + '//' + location.host + '/ws');
window.chat.ws = ws;

ws.onopen = () => {
  window.chat.opened = true;
  window.chat.openState = ws.readyState;
  show('connected', 'sys');
};
ws.onmessage = (e) => {
  window.chat.received.push(e.data);
  show(e.data);
};
ws.onerror = () => { window.chat.errors++; };
ws.onclose = (e) => {
  window.chat.close = { code: e.code, reason: e.reason, wasClean: e.wasClean };
  show('disconnected (code ' + e.code + ')', 'sys');
};

window.chatSend = (text) => {
  if (ws.readyState !== WebSocket.OPEN) return false;
  ws.send(text);
  window.chat.sent.push(text);
  return true;
};

document.getElementById('form').addEventListener('submit', (e) => {
  e.preventDefault();
  const input = document.getElementById('msg');
  if (input.value !== '' && window.chatSend(input.value)) input.value = '';
});
</script>
</body>
</html>
HTML

# Connected clients: their $send, keyed by a per-connection number.  This is
# per interpreter: with `pagi-rs --interpreters N` (or several reference
# server workers) a message reaches only the clients served by the same one.
my %clients;
my $next_id = 0;

async sub http_response {
    my ( $send, $status, $type, $body ) = @_;
    await $send->({
        type    => 'http.response.start',
        status  => $status,
        headers => [
            [ 'content-type',   $type ],
            [ 'content-length', length $body ],
        ],
    });
    await $send->({ type => 'http.response.body', body => $body, more => 0 });
}

async sub broadcast {
    my ($text) = @_;
    # wait_all, not one await after another: a client whose send fails (or
    # is slow to drain) must not keep the message from the others.
    await Future->wait_all(
        map { $_->({ type => 'websocket.send', text => $text }) } values %clients
    );
}

async sub chat {
    my ( $scope, $receive, $send ) = @_;

    # The handshake is only completed once we answer websocket.connect;
    # anything but /ws is refused with an ordinary HTTP response (PAGI Www
    # 0.6: a refusal is http.response.* before websocket.accept).
    my $connect = await $receive->();
    return unless $connect->{type} eq 'websocket.connect';
    if ( $scope->{path} ne '/ws' ) {
        return await http_response( $send, 404, 'text/plain', "No chat here\n" );
    }
    await $send->({ type => 'websocket.accept' });

    my $id = ++$next_id;
    $clients{$id} = $send;
    my $ok = eval {
        while (1) {
            my $event = await $receive->();
            last if $event->{type} eq 'websocket.disconnect';
            next unless $event->{type} eq 'websocket.receive';
            # Binary frames are not chat messages: ignored rather than
            # forwarded as text they may not be.
            await broadcast( $event->{text} ) if defined $event->{text};
        }
        1;
    };
    my $err = $@;
    # Removed whether the loop ended normally or died, so nobody keeps
    # sending to a connection that is gone.
    delete $clients{$id};
    die $err unless $ok;
}

my $app = async sub {
    my ( $scope, $receive, $send ) = @_;

    # No startup/shutdown work: returning without handling any lifespan
    # event tells the server the app declines the lifespan protocol.
    return if $scope->{type} eq 'lifespan';

    return await chat( $scope, $receive, $send ) if $scope->{type} eq 'websocket';

    die "Unsupported scope type: $scope->{type}\n" unless $scope->{type} eq 'http';

    if ( $scope->{path} eq '/' && ( $scope->{method} eq 'GET' || $scope->{method} eq 'HEAD' ) ) {
        return await http_response( $send, 200, 'text/html; charset=utf-8', $page );
    }
    return await http_response( $send, 404, 'text/plain', "Not found\n" );
};

$app;
