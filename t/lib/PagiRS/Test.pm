package PagiRS::Test;

# Test harness: runs the real pagi-rs binary on an ephemeral loopback port
# and talks to it over real sockets.

use strict;
use warnings;
use Exporter 'import';
use File::Temp qw(tempfile tempdir);
use Cwd ();
use File::Spec;
use FindBin;
use IO::Socket::INET;
use IO::Socket::UNIX;
use IO::Select;
use Socket qw(SOL_SOCKET SO_LINGER);
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);
use Test::More ();
use JSON::PP ();

our @EXPORT = (
    # running the server
    qw(pagi_bin write_app start_server wait_startup run_pagi spawn_pagi start_on_port free_port port_listening),
    qw(free_privileged_port readable_by_anyone),
    # talking to it
    qw(raw_request parse_response http_request connect_port host_header read_sock read_some abort_close),
    qw(ask_json),
    # files the server or the app wrote, and the server's memory
    qw(slurp file_lines wait_file_line wait_file_lines json_records wait_json_record vmrss_kb),
    # the fuzzers in bench/bin
    qw(run_fuzzer),
);

# Servers under test run in `-E none` unless a test says otherwise: the
# environment mode would otherwise follow whether stdin is a terminal
# (production turns the access log off), and no test should depend on how
# it was started.
$ENV{PAGI_ENV} //= 'none';

# Servers under test get the interpreter loop pagi-rs chooses, whatever the
# developer's own IO_ASYNC_LOOP says; t/64 sets it where it tests it.
delete $ENV{IO_ASYNC_LOOP};

my $ROOT = File::Spec->rel2abs( File::Spec->catdir( $FindBin::Bin, '..' ) );
$ROOT =~ s{/t/?\z}{} unless -d "$ROOT/src";
my $TMP = tempdir( CLEANUP => 1 );

# ---------------------------------------------------------------------------
# Running the server
# ---------------------------------------------------------------------------

# The pagi-rs binary under test: $PAGI_RS_BIN, else target/release/pagi-rs.
# A relative $PAGI_RS_BIN is taken from where the test started: tests start
# servers in other directories, and symlink the binary elsewhere.
my $START_DIR = Cwd::getcwd();
sub pagi_bin {
    return defined $ENV{PAGI_RS_BIN}
      ? File::Spec->rel2abs( $ENV{PAGI_RS_BIN}, $START_DIR )
      : "$ROOT/target/release/pagi-rs";
}

# Write a PAGI app (Perl source) to a temporary file; returns its path.
my $app_n = 0;
sub write_app {
    my ( $code, $name ) = @_;
    $name //= 'app' . ( ++$app_n ) . '.pl';
    my $path = "$TMP/$name";
    open my $fh, '>', $path or die "write $path: $!";
    print $fh $code;
    close $fh;
    return $path;
}

# Run pagi-rs to completion (for startup failures); returns (exit code, stderr, stdout).
sub run_pagi {
    my (@args) = @_;
    my ( undef, $err_file ) = tempfile( DIR => $TMP );
    my ( undef, $out_file ) = tempfile( DIR => $TMP );
    my $pid = fork // die "fork: $!";
    if ( !$pid ) {
        open STDIN,  '<', '/dev/null';
        open STDOUT, '>', $out_file;
        open STDERR, '>', $err_file;
        exec pagi_bin(), @args or POSIX::_exit(127);
    }
    my $deadline = time + 30;
    my $status;
    while ( time < $deadline ) {
        my $r = waitpid( $pid, WNOHANG );
        if ( $r == $pid ) { $status = $?; last }
        sleep 0.05;
    }
    if ( !defined $status ) {
        kill 'KILL', $pid;
        waitpid( $pid, 0 );
        $status = -1;
    }
    return ( $status == -1 ? -1 : $status >> 8, slurp($err_file), slurp($out_file) );
}

# Start pagi-rs with exactly @args (no implied -p 0) without waiting for it;
# an optional leading hashref { cwd => $dir } runs it in $dir.  Returns the server.
sub spawn_pagi {
    my $o = ref $_[0] eq 'HASH' ? shift : {};
    my (@args) = @_;
    my ( undef, $err_file ) = tempfile( DIR => $TMP );
    my $pid = fork // die "fork: $!";
    if ( !$pid ) {
        chdir $o->{cwd} or POSIX::_exit(126) if $o->{cwd};
        open STDIN,  '<', '/dev/null';
        open STDOUT, '>>', $err_file;
        open STDERR, '>>', $err_file;
        exec pagi_bin(), @args or POSIX::_exit(127);
    }
    return bless { pid => $pid, stderr_file => $err_file }, 'PagiRS::Test::Server';
}

# Start pagi-rs with @args (the app last); waits for the startup line.
# Unless @args name their own listeners (--listen, --socket), it listens on
# a free port.  The server's ->port is the first TCP listener's port,
# ->socket the first Unix socket's path, ->listeners every listener as the
# startup line names it (http://127.0.0.1:5000/, unix:/path).
sub start_server {
    my (@args) = @_;
    my $own_listeners = grep { /^--(?:listen|socket)(?:=|\z)/ } @args;
    return wait_startup( spawn_pagi( ( $own_listeners ? () : ( '-p', 0 ) ), @args ) );
}

# Wait for a spawned server's startup line (dies if it exits first or says
# nothing for 30 s); returns the server with its listeners filled in.
sub wait_startup {
    my ($self)   = @_;
    my $pid      = $self->{pid};
    my $err_file = $self->{stderr_file};
    my $deadline = time + 30;
    while ( time < $deadline ) {
        my $err = slurp($err_file);
        if ( $err =~ m{listening on (.*?) \(pid } ) {
            my @listeners = split /, /, $1;
            $self->{listeners} = \@listeners;
            for (@listeners) {
                if ( !defined $self->{port} && m{^https?://\[?([^\]/]+?)\]?:(\d+)/$} ) {
                    @$self{qw(host port)} = ( $1, $2 );
                }
                $self->{socket} //= $1 if /^unix:(.+)$/;
            }
            return $self;
        }
        if ( waitpid( $pid, WNOHANG ) == $pid ) {
            $self->{exited} = $? >> 8;
            die "pagi-rs exited during startup (code $self->{exited}):\n$err";
        }
        sleep 0.05;
    }
    kill 'KILL', $pid;
    die "pagi-rs did not print its startup line:\n" . slurp($err_file);
}

# Start pagi-rs on a chosen $port and wait until it accepts connections (works
# even when the startup line is suppressed); returns the server, or undef + diag.
sub start_on_port {
    my ( $port, @args ) = @_;
    my $s = spawn_pagi( '-p', $port, @args );
    $s->{port} = $port;
    my $t0 = time;
    while ( time - $t0 < 15 ) {
        if ( port_listening($port) ) {
            # Make sure it is ours that answered (not another process that
            # took the port first): ours must still be running.
            sleep 0.1;
            return $s if $s->is_running;
            last;
        }
        last unless $s->is_running;
        sleep 0.05;
    }
    Test::More::diag("server on $port did not come up:\n" . $s->output);
    $s->stop( 'KILL', 5 );
    return undef;
}

# A loopback port that was free a moment ago (bound, then released).
sub free_port {
    my $s = IO::Socket::INET->new( Listen => 1, LocalAddr => '127.0.0.1', LocalPort => 0, ReuseAddr => 1 )
      or die "free_port: $!";
    my $p = $s->sockport;
    close $s;
    return $p;
}

# A loopback port below 1024 that was free a moment ago (only root binds
# one, so serving on it proves a bind made before --user dropped root);
# undef if none was found.
sub free_privileged_port {
    for my $p ( map { 600 + int rand 400 } 1 .. 50 ) {
        my $try = IO::Socket::INET->new( Listen => 1, LocalAddr => '127.0.0.1', LocalPort => $p, ReuseAddr => 1 )
          or next;
        close $try;
        return $p;
    }
    return undef;
}

# A copy of $file that any user can read, in a directory any user can
# enter (an app for a server that runs as nobody); returns its path.
sub readable_by_anyone {
    my ($file) = @_;
    my $dir = tempdir( CLEANUP => 1 );
    chmod 0755, $dir;
    ( my $name = $file ) =~ s{.*/}{};
    my $copy = "$dir/$name";
    open my $in,  '<', $file or die "$file: $!";
    open my $out, '>', $copy or die "$copy: $!";
    print $out $_ while <$in>;
    close $out or die "$copy: $!";
    chmod 0644, $copy;
    return $copy;
}

# 1 if something accepts connections on 127.0.0.1:$port, else 0.
sub port_listening {
    my ($port) = @_;
    return IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 1 ) ? 1 : 0;
}

# ---------------------------------------------------------------------------
# Talking to it
# ---------------------------------------------------------------------------

# Send raw bytes; read until the peer closes, `until` matches, or timeout.
sub raw_request {
    my ( $port, $bytes, %o ) = @_;
    my $timeout = $o{timeout} // 5;
    my $sock = connect_port($port);
    $sock->syswrite($bytes) if length $bytes;
    my ($buf) = read_sock( $sock, $o{until}, $timeout );
    return wantarray ? ( $buf, $sock ) : $buf;
}

# A TCP connection to 127.0.0.1:$port, or with $port 'unix:PATH' a
# connection to the Unix socket at PATH (dies if it cannot connect).
sub connect_port {
    my ($port) = @_;
    if ( $port =~ /^unix:(.+)\z/s ) {
        return IO::Socket::UNIX->new( Peer => $1, Type => Socket::SOCK_STREAM() ) // die "connect $1: $!";
    }
    my $s = IO::Socket::INET->new( PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 5 )
      or die "connect: $!";
    return $s;
}

# What a request to $port (a port or 'unix:PATH') says in its Host header.
sub host_header {
    my ($port) = @_;
    return $port =~ /^unix:/ ? 'localhost' : "127.0.0.1:$port";
}

# A response head (status line and header lines, CRLF-separated) as
# (protocol, status, reason, {lc name => value, repeats joined by ", "},
# [[lc name, value], ...] in order); the empty list if the status line is bad.
sub parse_head {
    my ($head) = @_;
    my ( $line, @lines ) = split /\r\n/, $head;
    my ( $proto, $status, $reason ) = ( $line // '' ) =~ m{^(HTTP/\d\.\d) (\d{3})(?: (.*))?$}
      or return;
    my ( %h, @pairs );
    for (@lines) {
        my ( $n, $v ) = /^([^:]+):[ \t]*(.*?)[ \t]*$/ or next;
        push @pairs, [ lc $n, $v ];
        $h{ lc $n } = exists $h{ lc $n } ? "$h{lc $n}, $v" : $v;
    }
    return ( $proto, $status, $reason // '', \%h, \@pairs );
}

# One sysread from $sock appended to $$buf, waiting until $deadline (an
# epoch time).  Returns the byte count, 0 at EOF or on a read error (the
# error goes to $$error), or undef on timeout.  It polls once even at the
# deadline, so a timeout of 0 still reads what is already there.
sub read_some {
    my ( $sock, $buf, $deadline, $error ) = @_;
    my $sel = IO::Select->new($sock);
    while (1) {
        my $left = $deadline - time;
        $left = 0 if $left < 0;
        if ( !$sel->can_read($left) ) {
            next if time < $deadline;
            return undef;
        }
        my $n = sysread( $sock, $$buf, 65536, length $$buf );
        return $n if defined $n;
        next if $!{EINTR} || $!{EAGAIN} || $!{EWOULDBLOCK};
        $$error = "$!" if $error;
        return 0;
    }
}

# Read from $sock onto $buf until $re (if given) matches, the peer closes, or
# $timeout seconds pass.  Returns ($buf, $closed).
sub read_sock {
    my ( $sock, $re, $timeout, $buf ) = @_;
    $buf //= '';
    my $closed   = 0;
    my $sel      = IO::Select->new($sock);
    my $deadline = time + $timeout;
    while ( time < $deadline ) {
        last if $re && $buf =~ $re;
        my @r = $sel->can_read( $deadline - time ) or last;
        my $n = $sock->sysread( $buf, 65536, length $buf );
        if ( !$n ) { $closed = 1; last }
    }
    return ( $buf, $closed );
}

# One GET of $target on the kept-alive connection $sock (with extra header
# lines, "Name: value"), whose answer is JSON with a Content-Length:
# returns it decoded, or {} if none came.
sub ask_json {
    my ( $sock, $target, @headers ) = @_;
    my $req = "GET $target HTTP/1.1\r\nHost: 127.0.0.1\r\n" . join( '', map { "$_\r\n" } @headers ) . "\r\n";
    $sock->syswrite($req);
    my ($buf) = read_sock( $sock, qr/\r\n\r\n/, 5 );
    my ($len) = $buf =~ /content-length: (\d+)/i or return {};
    my $head = index( $buf, "\r\n\r\n" ) + 4;
    ($buf) = read_sock( $sock, qr/\A.{$head}.{$len}/s, 5, $buf );
    return eval { JSON::PP->new->decode( substr( $buf, $head, $len ) ) } // {};
}

# Parse one HTTP/1.x response (de-chunking); returns a hashref or undef.
sub parse_response {
    my ($raw) = @_;
    my $i = index( $raw, "\r\n\r\n" );
    return undef if $i < 0;
    my $head = substr( $raw, 0, $i );
    my $rest = substr( $raw, $i + 4 );
    my ( $status_line, @lines ) = split /\r\n/, $head;
    my ( $proto, $status, $reason ) = $status_line =~ m{^(HTTP/\d\.\d) (\d{3}) ?(.*)$} or return undef;
    my %h;
    my @pairs;
    for (@lines) {
        my ( $n, $v ) = /^([^:]+):\s*(.*)$/ or next;
        push @{ $h{ lc $n } }, $v;
        push @pairs, [ lc $n, $v ];
    }
    my %res = ( protocol => $proto, status => $status, reason => $reason, headers => \%h, header_list => \@pairs );
    my $te = join ',', @{ $h{'transfer-encoding'} // [] };
    if ( $te =~ /chunked/i ) {
        my $body = '';
        my %trailers;
        while (1) {
            $rest =~ s/^([0-9a-fA-F]+)[^\r\n]*\r\n// or do { $res{incomplete} = 1; last };
            my $len = hex $1;
            if ( $len == 0 ) {
                while ( $rest =~ s/^([^\r\n:]+):\s*([^\r\n]*)\r\n// ) { $trailers{ lc $1 } = $2 }
                $res{complete} = $rest =~ s/^\r\n//;
                last;
            }
            if ( length($rest) < $len + 2 ) { $body .= $rest; $rest = ''; $res{incomplete} = 1; last }
            $body .= substr( $rest, 0, $len );
            $rest = substr( $rest, $len + 2 );
        }
        $res{body}     = $body;
        $res{trailers} = \%trailers;
        $res{rest}     = $rest;
    }
    elsif ( defined( my $cl = $h{'content-length'} ) ) {
        $res{body} = substr( $rest, 0, $cl->[0] );
        $res{rest} = substr( $rest, length $res{body} );
        $res{incomplete} = 1 if length( $res{body} ) < $cl->[0];
    }
    else {
        $res{body} = $rest;
        $res{rest} = '';
    }
    return \%res;
}

# One request on a fresh connection; returns the parsed response.
sub http_request {
    my ( $port, $method, $path, %o ) = @_;
    my $headers = $o{headers} // [];
    my $body    = $o{body} // '';
    my $req = "$method $path HTTP/1.1\r\nHost: " . host_header($port) . "\r\nConnection: close\r\n";
    $req .= "$_->[0]: $_->[1]\r\n" for @$headers;
    $req .= "Content-Length: " . length($body) . "\r\n" if length $body;
    $req .= "\r\n$body";
    my $raw = raw_request( $port, $req, timeout => $o{timeout} // 10 );
    return parse_response($raw) // { status => 0, raw => $raw };
}

# Close $sock the way a client that vanishes does, with a reset (SO_LINGER
# 0).  A plain close sends a FIN, which after a complete request the server
# takes for a half-close: it still answers, and notices a client that has
# really gone only when a write fails.
sub abort_close {
    my ($sock) = @_;
    setsockopt( $sock, SOL_SOCKET, SO_LINGER, pack( 'ii', 1, 0 ) ) or die "SO_LINGER: $!";
    close $sock;
}

# ---------------------------------------------------------------------------
# The fuzzers in bench/bin
# ---------------------------------------------------------------------------

# Run the fuzzer at $path (named $name in its summary) with @args against
# the binary under test: it must exit 0, say PASS and print its seed (the
# test notes it, for a replay).  Returns its output.
sub run_fuzzer {
    my ( $name, $path, @args ) = @_;
    local $ENV{PAGI_RS_BIN} = pagi_bin();
    my $out = `$^X $path @args 2>&1`;
    Test::More::is( $? >> 8, 0, "$name: no violation" ) or Test::More::diag($out);
    Test::More::like( $out, qr/^\Q$name\E: PASS$/m, "$name: the summary says PASS" );
    my ($seed) = $out =~ /seed (\d+)/;
    Test::More::ok( defined $seed, "$name: the seed is printed" ) and Test::More::note("seed $seed");
    return $out;
}

# ---------------------------------------------------------------------------
# Files the server or the app wrote; the server's memory
# ---------------------------------------------------------------------------

# The whole of $file, or '' if it cannot be read.
sub slurp {
    my ($f) = @_;
    open my $fh, '<', $f or return '';
    local $/;
    my $s = <$fh>;
    return $s // '';
}

# The lines of $file, chomped; () if it cannot be read.
sub file_lines {
    my ($file) = @_;
    open my $fh, '<', $file or return ();
    chomp( my @l = <$fh> );
    return @l;
}

# Poll $file until it has at least $n lines (up to $timeout, default 5 s);
# returns its lines, however many there are by then.
sub wait_file_lines {
    my ( $file, $n, $timeout ) = @_;
    my $deadline = time + ( $timeout // 5 );
    while (1) {
        my @l = file_lines($file);
        return @l if @l >= $n || time > $deadline;
        sleep 0.02;
    }
}

# Poll $file until a line matches $re (up to $timeout, default 5 s); returns
# the first matching line, or undef.
sub wait_file_line {
    my ( $file, $re, $timeout ) = @_;
    my $deadline = time + ( $timeout // 5 );
    while ( time < $deadline ) {
        my @m = grep { $_ =~ $re } file_lines($file);
        return $m[0] if @m;
        sleep 0.05;
    }
    return undef;
}

# The JSON records (one per line) an app wrote to $file; () if unreadable.
sub json_records {
    my ($file) = @_;
    open my $fh, '<', $file or return ();
    my @r;
    while ( my $l = <$fh> ) {
        chomp $l;
        push @r, JSON::PP->new->decode($l);
    }
    return @r;
}

# Poll $file until a record satisfies $pred (up to $timeout, default 5 s);
# returns the last such record, or undef.
sub wait_json_record {
    my ( $file, $pred, $timeout ) = @_;
    my $deadline = time + ( $timeout // 5 );
    while (1) {
        my @hits = grep { $pred->($_) } json_records($file);
        return $hits[-1] if @hits;
        return undef if time > $deadline;
        sleep 0.05;
    }
}

# Resident set size of process $pid in kB (from /proc), or undef.
sub vmrss_kb {
    my ($pid) = @_;
    open my $fh, '<', "/proc/$pid/status" or return undef;
    while (<$fh>) { return $1 if /^VmRSS:\s+(\d+)\s+kB/ }
    return undef;
}

package PagiRS::Test::Server;

use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

sub port { $_[0]{port} }
sub host { $_[0]{host} }
sub socket    { $_[0]{socket} }
sub listeners { @{ $_[0]{listeners} // [] } }
sub pid  { $_[0]{pid} }
sub url  { my ( $s, $p ) = @_; "http://127.0.0.1:$s->{port}" . ( $p // '/' ) }

# Everything the server wrote to stderr/stdout so far.
sub output { PagiRS::Test::slurp( $_[0]{stderr_file} ) }

# Wait until the output matches $re (or timeout); returns true if it did.
sub wait_output {
    my ( $self, $re, $timeout ) = @_;
    my $deadline = time + ( $timeout // 5 );
    while ( time < $deadline ) {
        return 1 if $self->output =~ $re;
        sleep 0.05;
    }
    return 0;
}

sub is_running {
    my ($self) = @_;
    return 0 if defined $self->{exit_code};
    my $r = waitpid( $self->{pid}, WNOHANG );
    if ( $r == $self->{pid} ) { $self->{exit_code} = $? >> 8; return 0 }
    return 1;
}

# Send $sig (default TERM) and wait up to $timeout; returns the exit code,
# or undef if the process did not exit.
sub stop {
    my ( $self, $sig, $timeout ) = @_;
    return $self->{exit_code} if defined $self->{exit_code};
    kill $sig // 'TERM', $self->{pid};
    my $deadline = time + ( $timeout // 15 );
    while ( time < $deadline ) {
        my $r = waitpid( $self->{pid}, WNOHANG );
        if ( $r == $self->{pid} ) {
            $self->{exit_code} = $? >> 8;
            $self->{exit_signal} = $? & 127;
            return $self->{exit_code};
        }
        sleep 0.05;
    }
    return undef;
}

sub DESTROY {
    my ($self) = @_;
    return if defined $self->{exit_code};
    kill 'KILL', $self->{pid};
    waitpid( $self->{pid}, 0 );
}

1;
