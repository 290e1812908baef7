use strict;
use warnings;
use utf8;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use PagiRS::Browser;
use File::Temp qw(tempdir);
use JSON::PP ();

# The examples' pages in a real browser (headless Chromium over WebDriver):
# the page's own WebSocket and EventSource talk to pagi-rs, so this checks
# the handshake, framing and event-stream format the way browsers see them.

binmode Test::More->builder->$_, ':encoding(UTF-8)' for qw(output failure_output todo_output);

my $EXAMPLES = "$FindBin::Bin/../examples";

if ( my $why = PagiRS::Browser->missing ) {
    plan skip_all => "headless Chromium: $why" if ( $ENV{PAGI_RS_SKIP_BROWSER} // '' ) eq '1';
    fail "headless Chromium is needed for the browser tests: $why";
    diag "Install it with:  $PagiRS::Browser::APT_LINE\n"
      . "(or set PAGI_RS_SKIP_BROWSER=1 to skip these tests)";
    done_testing;
    exit;
}

my $browser = eval { PagiRS::Browser->new };
if ( !$browser ) {
    fail 'chromedriver and headless Chromium start';
    diag $@;
    done_testing;
    exit;
}
note 'Chromium ' . ( $browser->browser_version // '?' );

# On failure, what the server and the page said.
sub explain_failure {
    my ( $server, $ok ) = @_;
    return $ok if $ok;
    diag 'last script error: ' . $browser->last_error if $browser->last_error;
    my @console = map { "  $_->{level}: $_->{message}" } @{ $browser->console_log };
    diag "browser console:\n" . join "\n", @console if @console;
    diag "server output:\n" . $server->output;
    return $ok;
}

# ---------------------------------------------------------------------------
subtest 'websocket chat' => sub {
    my $server = start_server("$EXAMPLES/websocket/app.pl");
    my $url    = $server->url('/');

    $browser->get($url);
    is $browser->execute('return document.title'), 'PAGI WebSocket chat', 'page served over http';

    # The browser part; it stops at the first step that leaves nothing for
    # the next to check (no connection, no echo), instead of timing out on
    # each of them.
    subtest 'chat between two tabs' => sub {
        # The page connects by itself on load.
        $browser->wait_for( 'window.chat.opened || window.chat.close', timeout => 5 );
        explain_failure( $server, ok $browser->execute('return window.chat.opened'), 'first tab: WebSocket opened' )
          or return diag 'close event: ', explain( $browser->execute('return window.chat.close') );
        is $browser->execute('return window.chat.openState'), 1, 'readyState was OPEN (1) in onopen';
        my $tab_a = $browser->window_handle;

        # A second client in another tab.
        my $tab_b = $browser->new_window;
        $browser->get($url);
        $browser->wait_for( 'window.chat.opened || window.chat.close', timeout => 5 );
        explain_failure( $server, ok $browser->execute('return window.chat.opened'), 'second tab: WebSocket opened' )
          or return;

        # Non-ASCII text: the server decodes the frame into characters and
        # encodes them again on the way out, so a round trip is byte-exact
        # only if both directions are right.
        my $msg = 'hello from chromium ✓';
        ok $browser->execute( 'return window.chatSend(arguments[0])', $msg ), 'second tab sends';
        explain_failure( $server, ok $browser->wait_for( 'window.chat.received.length >= 1', timeout => 5 ),
            'second tab gets its own message back' ) or return;
        is_deeply $browser->execute('return window.chat.received'), [$msg], '... exactly once, unchanged';

        $browser->switch_to($tab_a);
        explain_failure( $server, ok $browser->wait_for( 'window.chat.received.length >= 1', timeout => 5 ),
            'first tab gets the broadcast' );
        is_deeply $browser->execute('return window.chat.received'), [$msg], '... exactly once, unchanged';

        # A clean close from the page: the server answers the Close frame,
        # so onclose reports the code the page sent and a clean close.
        $browser->execute('window.chat.ws.close(1000, "bye")');
        explain_failure( $server, ok $browser->wait_for( 'window.chat.close', timeout => 5 ), 'first tab: onclose fired' );
        my $close = $browser->execute('return window.chat.close') // {};
        is $close->{code},     1000, 'close code 1000';
        is $close->{wasClean}, 1,    'clean close (the server answered the Close frame)';
        is $browser->execute('return window.chat.ws.readyState'), 3, 'readyState CLOSED';

        # The chat goes on without the client that left.
        $browser->switch_to($tab_b);
        ok $browser->execute( 'return window.chatSend(arguments[0])', 'still here' ), 'second tab sends again';
        explain_failure( $server, ok $browser->wait_for( 'window.chat.received.length >= 2', timeout => 5 ),
            'and gets it back' );
        is_deeply $browser->execute('return window.chat.received'), [ $msg, 'still here' ],
          'second tab saw both messages';
        is $browser->execute('return window.chat.close'), undef, 'second tab still connected';

        $browser->switch_to($tab_a);
        is_deeply $browser->execute('return window.chat.received'), [$msg], 'the closed tab got nothing more';
    };
    # One tab left for what follows (closing a tab also closes its socket).
    my @tabs = @{ $browser->window_handles };
    for my $tab ( @tabs[ 1 .. $#tabs ] ) {
        $browser->switch_to($tab)->close_window;
    }
    $browser->switch_to( $tabs[0] );

    # Only /ws is a chat: a handshake elsewhere is refused with the app's
    # own 404 (an http.response.* refusal before websocket.accept).
    my $port = $server->port;
    my $raw  = raw_request(
        $port,
        "GET /elsewhere HTTP/1.1\r\nHost: 127.0.0.1:$port\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          . "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        until   => qr/\r\n\r\n/,
        timeout => 5,
    );
    my $res = parse_response($raw) // { status => 0 };
    is $res->{status}, 404, 'handshake on another path is refused with the app\'s 404';

    explain_failure( $server, unlike $server->output, qr/\b(?:ERROR|WARN)\b/, 'server logged no error or warning' );
    is $server->stop('TERM'), 0, 'server exits 0 on SIGTERM';
};

# ---------------------------------------------------------------------------
subtest 'server-sent events' => sub {
    my $server = start_server("$EXAMPLES/sse/app.pl");

    $browser->get( $server->url('/') );
    is $browser->execute('return document.title'), 'PAGI Server-Sent Events', 'page served over http';

    # Five progress events 0.2 s apart, then done: about a second.
    # An error event means the stream failed or ended early: no use waiting.
    $browser->wait_for( 'window.sse.done || window.sse.errors > 0', timeout => 8 );
    explain_failure( $server, ok $browser->execute('return window.sse.done'), 'the done event arrived' );

    my $received = $browser->execute('return window.received') // [];
    my @got      = map { { type => $_->{type}, id => $_->{id}, data => $_->{data} } } @$received;
    is_deeply \@got, [
        { type => 'progress', id => '1', data => '0% started' },
        { type => 'progress', id => '2', data => '25% downloading' },
        { type => 'progress', id => '3', data => "50% halfway\nstill downloading" },
        { type => 'progress', id => '4', data => '75% unpacking' },
        { type => 'progress', id => '5', data => '100% finished' },
        { type => 'done',     id => '6', data => 'job complete' },
    ], 'all events in order, with ids, multi-line data joined with "\n"'
      or diag explain $received;

    # Streamed as sent, not buffered until the end: the app pauses 0.2 s
    # after each progress event, so the first and the last arrive at least
    # 5 x 0.2 s apart (less a margin for timer granularity).
    if ( @$received == 6 ) {
        my $spread = $received->[-1]{t} - $received->[0]{t};
        cmp_ok $spread, '>=', 800, "events arrived spread over time (${spread} ms), not all at once";
    }
    else {
        fail 'events arrived spread over time (not all received)';
    }

    is $browser->execute('return window.sse.opened'), 1, 'one connection (no reconnect)';
    is $browser->execute('return window.sse.errors'), 0, 'no error event (the stream was not cut short)';

    # /events without Accept: text/event-stream is an ordinary http request.
    my $res = http_request( $server->port, 'GET', '/events' );
    is $res->{status}, 406, 'plain GET /events is told to ask for an event stream';

    explain_failure( $server, unlike $server->output, qr/\b(?:ERROR|WARN)\b/, 'server logged no error or warning' );
    is $server->stop('TERM'), 0, 'server exits 0 on SIGTERM';
};

# ---------------------------------------------------------------------------
# The same pages over https:// with a self-signed certificate, in a browser
# of their own that writes Chromium's net log: the log, Chromium's own record
# of what it sent, shows the page, the WebSocket (RFC 8441 extended CONNECT)
# and the EventSource each went over HTTP/2.
subtest 'over https: HTTP/2, WebSocket over HTTP/2, EventSource over HTTP/2' => sub {
    my $dir = tempdir( CLEANUP => 1 );
    my $made = system( 'openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256',
        '-nodes', '-keyout', "$dir/key.pem", '-out', "$dir/cert.pem", '-days', '2', '-subj', '/CN=localhost',
        '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1', '-addext', 'basicConstraints=critical,CA:FALSE' )
      == 0;
    ok $made, 'self-signed certificate made with openssl' or return;
    my @tls    = ( '--ssl-cert', "$dir/cert.pem", '--ssl-key', "$dir/key.pem", '--access-log-format', 'combined' );
    my $netlog = "$dir/netlog.json";
    my $tls_browser = eval {
        PagiRS::Browser->new(
            args => [ @PagiRS::Browser::CHROME_ARGS, '--ignore-certificate-errors', "--log-net-log=$netlog" ] );
    };
    ok $tls_browser, 'a second Chromium, writing its net log' or return diag $@;
    my $https = sub { my $url = $_[0]->url( $_[1] ); $url =~ s{^http:}{https:}; $url };

    my $chat = start_server( @tls, "$EXAMPLES/websocket/app.pl" );
    $tls_browser->get( $https->( $chat, '/' ) );
    is $tls_browser->execute('return document.title'), 'PAGI WebSocket chat', 'page served over https';
    is $tls_browser->execute('return performance.getEntriesByType("navigation")[0].nextHopProtocol'), 'h2',
      'Chromium reports the page came over h2 (ALPN)';
    $tls_browser->wait_for( 'window.chat.opened || window.chat.close', timeout => 5 );
    explain_failure( $chat, ok $tls_browser->execute('return window.chat.opened'), 'wss:// WebSocket opened' );
    my $msg = 'über HTTP/2 ✓';
    ok $tls_browser->execute( 'return window.chatSend(arguments[0])', $msg ), 'the page sends a message';
    explain_failure( $chat, ok $tls_browser->wait_for( 'window.chat.received.length >= 1', timeout => 5 ),
        'and gets it back through the server' );
    is_deeply $tls_browser->execute('return window.chat.received'), [$msg], '... unchanged';
    $tls_browser->execute('window.chat.ws.close(1000, "bye")');
    $tls_browser->wait_for( 'window.chat.close', timeout => 5 );
    my $close = $tls_browser->execute('return window.chat.close') // {};
    is $close->{code},     1000, 'close code 1000';
    is $close->{wasClean}, 1,    'clean close over the HTTP/2 stream';
    like $chat->output, qr{"CONNECT /ws HTTP/2" 200 }, 'the server logged the WebSocket as an HTTP/2 CONNECT, 200';

    my $sse = start_server( @tls, "$EXAMPLES/sse/app.pl" );
    $tls_browser->get( $https->( $sse, '/' ) );
    $tls_browser->wait_for( 'window.sse.done || window.sse.errors > 0', timeout => 8 );
    explain_failure( $sse, ok $tls_browser->execute('return window.sse.done'), 'EventSource over https: done arrived' );
    is scalar @{ $tls_browser->execute('return window.received') // [] }, 6, 'all six events';
    is $tls_browser->execute('return window.sse.errors'), 0, 'no error event';
    $tls_browser->quit;    # writes the net log out

    # Chromium's net log: every HTTP/2 HEADERS frame it sent, by path.
    my %sent_h2;
    my $log = eval { JSON::PP->new->decode( PagiRS::Test::slurp($netlog) ) };
    ok $log, 'Chromium wrote a net log' or return diag $@;
    my %type_name = reverse %{ $log->{constants}{logEventTypes} // {} };
    for my $event ( @{ $log->{events} // [] } ) {
        next unless ( $type_name{ $event->{type} } // '' ) eq 'HTTP2_SESSION_SEND_HEADERS';
        my %h = map { /^(:?[^:]+): (.*)$/ ? ( $1 => $2 ) : () } @{ $event->{params}{headers} // [] };
        push @{ $sent_h2{ $h{':path'} // '' } }, \%h;
    }
    ok $sent_h2{'/'}, 'net log: the page was requested in an HTTP/2 session';
    my ($ws) = grep { ( $_->{':method'} // '' ) eq 'CONNECT' } @{ $sent_h2{'/ws'} // [] };
    ok $ws, 'net log: the WebSocket was an HTTP/2 extended CONNECT'
      or diag explain \%sent_h2;
    is $ws && $ws->{':protocol'}, 'websocket', '... with :protocol websocket (RFC 8441)';
    my ($events) = @{ $sent_h2{'/events'} // [] };
    ok $events, 'net log: the EventSource was requested in an HTTP/2 session';
    like $events && $events->{accept}, qr{text/event-stream}, '... asking for an event stream';

    explain_failure( $chat, unlike $chat->output, qr/\b(?:ERROR|WARN)\b/, 'chat server logged no error or warning' );
    explain_failure( $sse,  unlike $sse->output,  qr/\b(?:ERROR|WARN)\b/, 'SSE server logged no error or warning' );
    is $chat->stop('TERM'), 0, 'chat server exits 0';
    is $sse->stop('TERM'),  0, 'SSE server exits 0';
};

$browser->quit;
done_testing;
