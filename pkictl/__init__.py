"""pkictl: what people do by hand with the IoT PKI (root CA, verification, doctor, local stack)."""
