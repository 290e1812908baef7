package MalformedRequest;

# What no request that reaches an app may have, whatever the protocol: a
# path outside origin form (but * for OPTIONS), a header name that is not
# a lower-case token, a value with CR, LF or NUL or padded with whitespace
# (RFC 9113 8.2.1; HTTP/1.1 trims it), a host that is not host[:port], two
# hosts (RFC 9112 3.2, RFC 9113 8.3.1).  Loaded by the apps of
# bench/bin/wire-fuzz and bench/bin/h2-fuzz, which report what it finds.

use strict;
use warnings;
use Exporter 'import';

our @EXPORT_OK = qw(anomalies);

my $valid_host = qr{\A(?:\[[A-Za-z0-9:._~!\$&'()*+,;=%-]+\]|[A-Za-z0-9._~!\$&'()*+,;=%-]*)(?::[0-9]*)?\z};

# The scope's faults, each a short description; none for a sound request.
sub anomalies {
    my ($scope) = @_;
    my @bad;
    my $path = $scope->{path} // '';
    push @bad, "the path of " . ( $scope->{raw_path} // $path )
      unless $path =~ m{^/} || ( $path eq '*' && ( $scope->{method} // '' ) eq 'OPTIONS' );
    my @headers = @{ $scope->{headers} || [] };
    for my $h (@headers) {
        my ( $n, $v ) = @$h;
        push @bad, "header name '$n'" if $n eq '' || $n =~ /[^a-z0-9!#\$%&'*+.^_`|~-]/;
        push @bad, "a CR, LF or NUL in the value of $n" if $v =~ /[\r\n\0]/;
        push @bad, "the value of $n padded with whitespace" if $v =~ /\A[ \t]|[ \t]\z/;
        push @bad, "host '$v'" if $n eq 'host' && $v !~ $valid_host;
    }
    push @bad, 'more than one host' if grep( { $_->[0] eq 'host' } @headers ) > 1;
    return @bad;
}

1;
