#!/bin/sh
# Make the secrets deploy/compose.yaml reads, in deploy/secrets/ (git-ignored): a private CA, the
# broker's TLS certificate (for the name `kafka`), one random password per Kafka principal, the
# broker's JAAS file and the admin's client.properties. For the local stack only: production gets
# its certificates and passwords from its own CA and secret store (deploy/README.md).
#
#   sh deploy/kafka/make-dev-secrets.sh [OUT]        # OUT defaults to deploy/secrets
set -eu
out=${1:-$(dirname "$0")/../secrets}
mkdir -p "$out"
cd "$out"
umask 077
[ -f ca.key ] || openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=gateway dev Kafka CA" \
    -keyout ca.key -out ca.crt 2>/dev/null
if [ ! -f broker.pem ]; then
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kafka" -keyout broker.key -out broker.csr 2>/dev/null
    printf 'subjectAltName=DNS:kafka\nextendedKeyUsage=serverAuth,clientAuth\n' > broker.ext
    openssl x509 -req -in broker.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -extfile broker.ext \
        -out broker.crt 2>/dev/null
    # Kafka's PEM key store: the unencrypted PKCS#8 key, then the certificate.
    openssl pkey -in broker.key -out broker.pk8
    cat broker.pk8 broker.crt > broker.pem
    rm -f broker.csr broker.ext broker.key broker.pk8
fi
for principal in admin gateway materializer ctl; do
    [ -f "$principal.password" ] || openssl rand -hex 24 > "$principal.password"
done
pw() { cat "$1.password"; }
cat > kafka_server_jaas.conf <<JAAS
KafkaServer {
    org.apache.kafka.common.security.plain.PlainLoginModule required
    username="admin" password="$(pw admin)"
    user_admin="$(pw admin)"
    user_gateway="$(pw gateway)"
    user_materializer="$(pw materializer)"
    user_ctl="$(pw ctl)";
};
JAAS
cat > admin.properties <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=PLAIN
sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="$(pw admin)";
ssl.truststore.type=PEM
ssl.truststore.location=/run/secrets/kafka-ca
PROPS
# Compose bind-mounts file secrets with these modes; the containers run as other users
# (kafka: appuser, gateway: 10001). Private keys and passwords stay out of git (.gitignore).
chmod 0644 ca.crt broker.pem kafka_server_jaas.conf admin.properties ./*.password
echo "secrets in $(pwd)"
