package PagiRS::H2;

# Frame-level HTTP/2 tests from Perl: runs a Python script that uses
# t/lib/h2client.py (the `h2` library over raw sockets) and returns what the
# script passed to emit(), decoded from JSON.
#
#   use PagiRS::H2;
#   if ( my $why = PagiRS::H2->missing ) { fail ...; diag $why }
#   my $r = h2_run( <<'PY', port => $server->port );
#   c = connect()
#   s = c.wait_stream(c.request('GET', '/'))
#   emit({'status': s.status, 'body': s.data})
#   PY
#   is $r->{status}, 200;
#
# The script runs with everything h2client exports already imported, and
# HOST, PORT and ARGS (the `args` option) defined.  Non-ASCII text in a
# script: write the test with `use utf8` (the script is then encoded to
# UTF-8 for Python), or pass UTF-8 bytes.  A script that raises,
# prints no result or outlives its timeout makes h2_run return undef (and
# diag why: the Python traceback, its stderr); it never hangs the test.
# The Python API (connect, H2Client, Stream, WebSocket, ws_frame, ...) is
# documented in t/lib/h2client.py; t/03-h2-harness.t shows it at work.

use strict;
use warnings;
use Exporter 'import';
use Encode ();
use File::Basename qw(dirname);
use File::Spec;
use File::Temp qw(tempfile tempdir);
use JSON::PP ();
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

our @EXPORT    = qw(h2_run h2_header);
our @EXPORT_OK = qw(h2_run h2_header h2_python);

our $APT_LINE = 'apt-get install -y python3-h2 python3-hyperframe';

# Seconds a script may run unless the caller says otherwise.
our $DEFAULT_TIMEOUT = 15;

my $LIB = File::Spec->rel2abs( File::Spec->catdir( dirname(__FILE__), '..' ) );
my $TMP = tempdir( CLEANUP => 1 );
my $JSON = JSON::PP->new->canonical;

sub _which {
    my ($prog) = @_;
    for my $dir ( split /:/, $ENV{PATH} // '' ) {
        return "$dir/$prog" if length $dir && -f "$dir/$prog" && -x _;
    }
    return;
}

# The Python that has the h2 library: $PAGI_RS_PYTHON, else the first of
# python3 on PATH and /usr/bin/python3 that can import h2 and hyperframe
# (a pyenv or virtualenv python3 on PATH does not see Debian's packages).
my ( $python, @tried );
sub h2_python {
    return $python if defined $python;
    my @candidates = grep { defined } ( $ENV{PAGI_RS_PYTHON} || ( _which('python3'), '/usr/bin/python3' ) );
    my %seen;
    for my $py ( grep { !$seen{$_}++ } @candidates ) {
        push @tried, $py;
        next unless -x $py;
        my $pid = fork // die "fork: $!";
        if ( !$pid ) {
            open STDIN,  '<', '/dev/null';
            open STDOUT, '>', '/dev/null';
            open STDERR, '>', '/dev/null';
            exec $py, '-c', 'import h2, hyperframe, h2.settings; h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL'
              or POSIX::_exit(127);
        }
        waitpid( $pid, 0 );
        return $python = $py if $? == 0;
    }
    return;
}

# undef when a Python with h2 is there, else what is missing and how to
# install it.
sub missing {
    return undef if h2_python();
    return "no python3 with the h2 library (tried: @tried); install it with: $APT_LINE";
}

# At the top of an HTTP/2 test file: without the Python h2 library the
# file fails (it is a missing test dependency, not a reason to skip) and
# ends there.
sub require_client {
    my $why = missing() // return;
    Test::More::fail('python3 with the h2 library is needed for the HTTP/2 tests');
    Test::More::diag($why);
    Test::More::done_testing();
    exit;
}

# h2_run($script, %opt) runs $script (Python source) and returns its
# result.  Options:
#   port     the server's port (H2_PORT; PORT in the script)
#   host     default 127.0.0.1 (H2_HOST; HOST)
#   args     a hashref, JSON-encoded into ARGS (paths, pids, sizes, ...)
#   timeout  seconds before the script is stopped (default 15); the script
#            gets an exception one second before, so its traceback shows
#            where it was
#   env      a hashref of extra environment variables
#   quiet    do not diag a failure (for tests of failures)
# Returns the result (hashref, arrayref or scalar); in list context
# (result, error).  On failure the result is undef in scalar context (in
# list context, whatever the script emitted before it failed) and the error
# is also reported with Test::More's diag.
sub h2_run {
    my ( $script, %o ) = @_;
    my ( $result, $error ) = _run( $script, %o );
    if ( defined $error ) {
        Test::More::diag("h2 script failed: $error") if $INC{'Test/More.pm'} && !$o{quiet};
        return wantarray ? ( $result, $error ) : undef;
    }
    return wantarray ? ( $result, undef ) : $result;
}

sub _run {
    my ( $script, %o ) = @_;
    my $py = h2_python() or return ( undef, missing() );
    my $timeout = $o{timeout} // $DEFAULT_TIMEOUT;
    my ( $sfh, $sfile ) = tempfile( 'h2script-XXXXXX', SUFFIX => '.py', DIR => $TMP );
    # A script from a `use utf8` test is characters; Python reads UTF-8.
    print $sfh utf8::is_utf8($script) ? Encode::encode( 'UTF-8', $script ) : $script;
    close $sfh;
    my ( undef, $out_file ) = tempfile( DIR => $TMP );
    my ( undef, $err_file ) = tempfile( DIR => $TMP );

    my %env = (
        H2_HOST     => $o{host} // '127.0.0.1',
        H2_PORT     => $o{port} // '',
        H2_ARGS     => $JSON->encode( $o{args} // {} ),
        H2_DEADLINE => ( $timeout > 2 ? $timeout - 1 : $timeout * 0.75 ),
        PYTHONPATH  => join( ':', $LIB, grep { defined && length } $ENV{PYTHONPATH} ),
        PYTHONDONTWRITEBYTECODE => 1,
        %{ $o{env} // {} },
    );
    my $pid = fork // die "fork: $!";
    if ( !$pid ) {
        @ENV{ keys %env } = values %env;
        open STDIN,  '<', '/dev/null';
        open STDOUT, '>', $out_file;
        open STDERR, '>', $err_file;
        exec $py, "$LIB/h2client.py", $sfile or POSIX::_exit(127);
    }
    my $deadline = time + $timeout;
    my $status;
    while (1) {
        if ( waitpid( $pid, WNOHANG ) == $pid ) { $status = $?; last }
        last if time > $deadline;
        sleep 0.02;
    }
    my $stderr = sub { my $e = _slurp($err_file); length $e ? "\n--- stderr ---\n$e" : '' };
    if ( !defined $status ) {
        kill 'KILL', $pid;
        waitpid( $pid, 0 );
        return ( undef, "timed out after $timeout s and was killed" . $stderr->() );
    }
    my $out = _slurp($out_file);
    my ($line) = $out =~ /^(\{.*\})\s*\z/ms;
    my $envelope = defined $line ? eval { $JSON->decode($line) } : undef;
    if ( ref $envelope ne 'HASH' ) {
        return ( undef, "exited with status " . ( $status >> 8 ) . " without a result" . $stderr->() );
    }
    return ( $envelope->{result}, "raised:\n$envelope->{error}" . $stderr->() ) unless $envelope->{ok};
    return ( undef, 'no result: the script never called emit()' . $stderr->() )
      unless exists $envelope->{result} && defined $envelope->{result};
    return ( $envelope->{result}, undef );
}

sub _slurp {
    my ($f) = @_;
    open my $fh, '<', $f or return '';
    local $/;
    return <$fh> // '';
}

# A response header of a stream a script emitted (its `headers` pairs):
# the values joined with ', ', or undef.
sub h2_header {
    my ( $stream, $name ) = @_;
    my @v = map { $_->[1] } grep { $_->[0] eq $name } @{ $stream->{headers} // [] };
    return @v ? join( ', ', @v ) : undef;
}

1;
