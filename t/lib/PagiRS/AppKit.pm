package PagiRS::AppKit;

# Helpers for test apps (they run inside pagi-rs; load with `use lib` on
# t/lib): record what the app saw as JSON lines for the test to read, parse
# the query string, and wait for an event with a deadline.
#
#   use PagiRS::AppKit;
#   PagiRS::AppKit::record_to($dir);
#   rec("name.seen", { ... });            # appends a JSON line to $dir/name.seen

use strict;
use warnings;
use Exporter 'import';
use Future;
use Future::AsyncAwait;
use Future::IO;
use JSON::PP ();

our @EXPORT = qw(rec query next_event $plain);

our $plain = [ [ 'content-type', 'text/plain' ] ];

my $dir;
my $J = JSON::PP->new->canonical->utf8->allow_nonref;

# Where rec() writes.
sub record_to { $dir = shift }

sub rec {
    my ( $file, $data ) = @_;
    die "PagiRS::AppKit: record_to was not called\n" unless defined $dir;
    open my $fh, '>>', "$dir/$file" or die "open $dir/$file: $!";
    print $fh $J->encode($data), "\n";
    close $fh;
}

# The query string as a hash (a key without a value is 1).
sub query {
    my ($scope) = @_;
    return { map { my ( $k, $v ) = split /=/, $_, 2; ( $k, $v // 1 ) } split /&/, $scope->{query_string} // '' };
}

# The next event, or {type => 'timeout'} after $secs: a test that fails
# must not leave the app waiting for ever.
async sub next_event {
    my ( $receive, $secs ) = @_;
    return await Future->wait_any( $receive->(),
        Future::IO->sleep($secs)->then( sub { Future->done( { type => 'timeout' } ) } ) );
}

1;
