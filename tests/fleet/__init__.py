"""Tests of the fleet side: release server and its MQTT transport."""
