"""The oslo.messaging driver plugin: `transport_url = meshbus://host:5672/` puts a service that uses
oslo.messaging (18.x) on a meshbus router, for RPC and notifications. oslo.messaging finds the driver by the
URL's scheme through the `oslo.messaging.drivers` entry point `meshbus` (see driver.py)."""
